"""Every malformed input gets a 4xx (gRPC: its status code) naming the problem, never a 5xx or internals.

One table across the three protocols of one live server (``live_server``, API key on):

* REST (``/segment``, ``/refine``) carries encoded files, so the image-format cases (not an image,
  truncated PNG/JPEG, unsupported format, decompression bomb, byte limit, DICOM without pixels) and
  the prompt cases (outside the image, inverted box, too many points, all-zero/all-one prior mask) apply;
* OIP over HTTP and gRPC carry raw pixel tensors, so the tensor cases (wrong name, datatype, shape,
  element count, NaN/inf, byte limit) apply.

Each row asserts the status, that the message names the problem (a needle), and that the answer holds
no stack trace, source file or server path.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import httpx
import numpy as np
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tests.support.bad_inputs import assert_no_leak, dicom_bytes, header_only_png, phantom_png, pil_bytes

pytestmark = pytest.mark.timeout(300)

LIMIT_BYTES = 20 * 1024 * 1024  # the default MEDREFINE_MAX_UPLOAD_BYTES of the live server
LIMIT_PIXELS = 40_000_000  # the default MEDREFINE_MAX_PIXELS

_PNG = phantom_png(seed=5, size=64)
_IMAGE = (np.indices((64, 64)).sum(axis=0) * 2 % 256).astype(np.uint8)
_JPEG = pil_bytes(_IMAGE, "JPEG", quality=90)
_ZEROS_PNG = pil_bytes(np.zeros((64, 64), np.uint8), "PNG")
_ONES_PNG = pil_bytes(np.full((64, 64), 255, np.uint8), "PNG")


@dataclass(frozen=True)
class Case:
    """One malformed request: ``send(server) -> (status, message, raw text)``; ``status`` is HTTP or gRPC."""

    protocol: str
    problem: str
    send: Callable
    status: int | grpc.StatusCode
    needle: str
    field: str | None = "unchecked"

    @property
    def id(self) -> str:
        return f"{self.protocol}-{self.problem}"


# --------------------------------------------------------------------------------------------------------
# REST
# --------------------------------------------------------------------------------------------------------


def _rest(route: str, file: tuple[str, bytes] | None, data: dict | None = None, prior: bytes | None = None):
    def send(server):
        files = {"file": file} if file is not None else {}
        if prior is not None:
            files["prior_mask"] = ("prior.png", prior, "image/png")
        with server.client(timeout=60) as client:
            response = client.post(route, files=files, data=data or {})
        return response

    return send


def _rest_oversized(server):
    body = b"\x89PNG\r\n\x1a\n" + bytes(LIMIT_BYTES + 1024)
    with server.client(timeout=60) as client:
        return client.post("/segment", files={"file": ("big.png", body, "image/png")})


REST_CASES = [
    Case("rest", "not_an_image", _rest("/segment", ("notes.txt", b"patient notes, not pixels " * 20)), 415,
         "not an image", "file"),
    Case("rest", "truncated_png", _rest("/segment", ("cut.png", _PNG[: len(_PNG) // 2])), 400, "truncated", "file"),
    Case("rest", "truncated_jpeg", _rest("/segment", ("cut.jpg", _JPEG[: len(_JPEG) // 2])), 400, "truncated",
         "file"),
    Case("rest", "unsupported_gif", _rest("/segment", ("x.gif", pil_bytes(_IMAGE, "GIF"))), 415,
         "unsupported format GIF", "file"),
    Case("rest", "unsupported_bmp", _rest("/segment", ("x.bmp", pil_bytes(_IMAGE, "BMP"))), 415,
         "unsupported format BMP", "file"),
    # 81 MP claimed with 64 bytes of data: decoding first would report truncation (400); the header check
    # refuses it before any pixel is inflated.
    Case("rest", "decompression_bomb", _rest("/segment", ("bomb.png", header_only_png(9000, 9000))), 413,
         f"81000000 pixels is over the limit of {LIMIT_PIXELS} pixels", "file"),
    Case("rest", "over_byte_limit", _rest_oversized, 413, f"the limit is {LIMIT_BYTES} bytes", "file"),
    Case("rest", "dicom_without_pixels", _rest("/segment", ("report.dcm", dicom_bytes(pixels=None))), 400,
         "has no pixel data", "file"),
    Case("rest", "nan_threshold", _rest("/segment", ("p.png", _PNG), {"threshold": "nan"}), 400,
         "finite number", "threshold"),
    Case("rest", "box_outside_image", _rest("/refine", ("p.png", _PNG), {"box": "[10, 10, 500, 20]"}), 400,
         "outside the image (width 64, height 64)", "box"),
    Case("rest", "points_outside_image",
         _rest("/refine", ("p.png", _PNG), {"points": "[[5, 5], [70, -3]]", "point_labels": "[1, 0]"}), 400,
         "points [[70.0, -3.0]] lie outside the image", "points"),
    Case("rest", "inverted_box", _rest("/refine", ("p.png", _PNG), {"box": "[40, 10, 20, 30]"}), 400,
         "inverted or empty", "box"),
    Case("rest", "box_not_json", _rest("/refine", ("p.png", _PNG), {"box": "40,10,20,30"}), 400,
         "box: expected JSON array text such as [10, 20, 110, 140]", "box"),
    Case("rest", "too_many_points",
         _rest("/refine", ("p.png", _PNG), {"points": json.dumps([[5, 5]] * 17), "point_labels": json.dumps([1] * 17)}),
         400, "at most 16 allowed (max_points)", "points"),
    Case("rest", "all_zero_prior_mask", _rest("/refine", ("p.png", _PNG), prior=_ZEROS_PNG), 400,
         "prior_mask is all zero", "prior_mask"),
    Case("rest", "all_one_prior_mask", _rest("/refine", ("p.png", _PNG), prior=_ONES_PNG), 400,
         "prior_mask is all one", "prior_mask"),
]

# --------------------------------------------------------------------------------------------------------
# OIP over HTTP (KServe v2 JSON and binary tensors)
# --------------------------------------------------------------------------------------------------------


def _oip_json(name="IMAGE", datatype="UINT8", shape=(4, 4), data=None):
    data = list(range(16)) if data is None else data
    document = {"inputs": [{"name": name, "datatype": datatype, "shape": list(shape), "data": data}]}
    return json.dumps(document).encode(), {"Content-Type": "application/json"}


def _oip_binary(name: str, datatype: str, shape: tuple[int, ...], raw: bytes):
    header = json.dumps({"inputs": [{"name": name, "datatype": datatype, "shape": list(shape),
                                     "parameters": {"binary_data_size": len(raw)}}]}).encode()
    return header + raw, {"Content-Type": "application/octet-stream",
                          "Inference-Header-Content-Length": str(len(header))}


def _oip(body_and_headers):
    body, headers = body_and_headers

    def send(server):
        return httpx.post(server.url + "/v2/models/segment/infer", content=body, timeout=60,
                          headers={**server.headers(), **headers})

    return send


def _oip_oversized(server):
    return httpx.post(server.url + "/v2/models/segment/infer", content=bytes(LIMIT_BYTES + 1024), timeout=60,
                      headers={**server.headers(), "Content-Type": "application/json"})


_NAN_JSON = (b'{"inputs":[{"name":"IMAGE","datatype":"FP32","shape":[2,2],"data":[0.5,NaN,0.1,0.2]}]}',
             {"Content-Type": "application/json"})

OIP_CASES = [
    Case("oip-http", "wrong_tensor_name", _oip(_oip_json(name="PIXELS")), 400,
         "unknown input 'PIXELS' for model 'segment'; expected: IMAGE"),
    Case("oip-http", "wrong_dtype", _oip(_oip_json(datatype="INT32")), 400,
         "input 'IMAGE' has datatype INT32, model 'segment' expects UINT8"),
    Case("oip-http", "wrong_shape", _oip(_oip_json(shape=(1, 4, 4))), 400, "input 'IMAGE' has shape [1, 4, 4]"),
    Case("oip-http", "element_count", _oip(_oip_json(shape=(4, 5))), 400, "has 16 elements but shape [4, 5] needs 20"),
    Case("oip-http", "nan", _oip(_NAN_JSON), 400, "holds a non-finite value (nan)"),
    Case("oip-http", "inf", _oip(_oip_binary("IMAGE", "FP32", (2,), np.array([1.0, np.inf], "<f4").tobytes())), 400,
         "holds a non-finite value (inf)"),
    Case("oip-http", "not_json", _oip((b"\x89PNG\r\n\x1a\n", {"Content-Type": "application/json"})), 400,
         "not valid JSON"),
    Case("oip-http", "over_byte_limit", _oip_oversized, 413, f"the limit is {LIMIT_BYTES} bytes"),
]

# --------------------------------------------------------------------------------------------------------
# gRPC (KServe v2 GRPCInferenceService)
# --------------------------------------------------------------------------------------------------------


def _grpc(name="IMAGE", datatype="UINT8", shape=(4, 4), raw=bytes(16)):
    def send(server):
        request = service_pb2.ModelInferRequest(model_name="segment")
        request.inputs.add(name=name, datatype=datatype, shape=list(shape))
        request.raw_input_contents.append(raw)
        metadata = [(k.lower(), v) for k, v in server.headers().items()]
        with grpc.insecure_channel(server.grpc_address) as channel:
            try:
                service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60, metadata=metadata)
            except grpc.RpcError as error:
                return error
        raise AssertionError("the malformed request was answered OK")

    return send


GRPC_CASES = [
    Case("grpc", "wrong_tensor_name", _grpc(name="PIXELS"), grpc.StatusCode.INVALID_ARGUMENT,
         "unknown input 'PIXELS' for model 'segment'; expected: IMAGE"),
    Case("grpc", "wrong_dtype", _grpc(datatype="INT8"), grpc.StatusCode.INVALID_ARGUMENT,
         "input 'IMAGE' has datatype INT8, model 'segment' expects UINT8"),
    Case("grpc", "wrong_shape", _grpc(shape=(2, 2, 4)), grpc.StatusCode.INVALID_ARGUMENT,
         "input 'IMAGE' has shape [2, 2, 4]"),
    Case("grpc", "byte_count", _grpc(raw=bytes(15)), grpc.StatusCode.INVALID_ARGUMENT,
         "has 15 bytes of data but shape [4, 4] of UINT8 needs 16"),
    Case("grpc", "nan", _grpc(datatype="FP32", shape=(2,), raw=np.array([np.nan, 0.0], "<f4").tobytes()),
         grpc.StatusCode.INVALID_ARGUMENT, "holds a non-finite value (nan)"),
    Case("grpc", "inf", _grpc(datatype="FP64", shape=(2,), raw=np.array([0.0, -np.inf], "<f8").tobytes()),
         grpc.StatusCode.INVALID_ARGUMENT, "holds a non-finite value (-inf)"),
    Case("grpc", "over_byte_limit", _grpc(shape=(LIMIT_BYTES + 1024,), raw=bytes(LIMIT_BYTES + 1024)),
         grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max"),
]

CASES = REST_CASES + OIP_CASES + GRPC_CASES


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_is_refused_naming_the_problem(live_server, case: Case):
    answer = case.send(live_server)
    if case.protocol == "grpc":
        assert answer.code() == case.status, (answer.code(), answer.details())
        message, text = answer.details(), answer.details()
    else:
        assert answer.status_code == case.status, answer.text
        assert answer.headers["content-type"].startswith("application/json"), answer.headers
        body = answer.json()
        message, text = body["error"], answer.text
        if case.protocol == "rest":
            assert "field" in body
            if case.field != "unchecked":
                assert body["field"] == case.field, body
        else:  # the Open Inference Protocol's error shape, whichever layer refused (the guard included)
            assert set(body) == {"error"}, body
    assert isinstance(message, str) and case.needle.lower() in message.lower(), message
    assert_no_leak(text)


def test_every_problem_of_the_issue_is_covered():
    """The table holds each problem class for each protocol it applies to (a row cannot silently vanish)."""
    problems = {(case.protocol, case.problem) for case in CASES}
    rest = {"not_an_image", "truncated_png", "truncated_jpeg", "unsupported_gif", "decompression_bomb",
            "over_byte_limit", "dicom_without_pixels", "box_outside_image", "points_outside_image",
            "inverted_box", "box_not_json", "too_many_points", "all_zero_prior_mask", "all_one_prior_mask"}
    tensors = {"wrong_tensor_name", "wrong_dtype", "wrong_shape", "nan", "inf", "over_byte_limit"}
    assert {("rest", p) for p in rest} <= problems
    assert {("oip-http", p) for p in tensors} <= problems
    assert {("grpc", p) for p in tensors} <= problems



def test_controls_the_same_requests_well_formed_are_answered(live_server):
    """The refusals above are about the bad part only: well-formed versions of the same requests pass."""
    prior = np.zeros((64, 64), np.uint8)
    prior[20:40, 16:44] = 255
    with live_server.client(timeout=60) as client:
        jpeg = client.post("/segment", files={"file": ("ok.jpg", _JPEG, "image/jpeg")})
        refine = client.post("/refine", files={"file": ("p.png", _PNG, "image/png"),
                                               "prior_mask": ("prior.png", pil_bytes(prior, "PNG"), "image/png")},
                             data={"box": "[16, 20, 44, 40]", "points": "[[30, 30]]", "point_labels": "[1]"})
        dicom = client.post("/segment", files={"file": ("us.dcm", dicom_bytes(pixels=_IMAGE), "application/dicom")})
    assert jpeg.status_code == 200, jpeg.text
    assert refine.status_code == 200, refine.text
    assert refine.json()["shape"] == [64, 64]
    assert dicom.status_code == 200, dicom.text
    assert dicom.json()["area_mm2"] == pytest.approx(dicom.json()["area_px"] * 0.01)
    document = {"inputs": [{"name": "IMAGE", "datatype": "UINT8", "shape": [64, 64], "data": _IMAGE.ravel().tolist()}]}
    oip = httpx.post(live_server.url + "/v2/models/segment/infer", json=document, headers=live_server.headers(),
                     timeout=60)
    assert oip.status_code == 200, oip.text
