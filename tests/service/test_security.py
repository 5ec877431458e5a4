"""Security properties of the code base and of a live server.

* Weights are only deserialised safely: no ``torch.load`` without ``weights_only=True``, no
  ``pickle.load(s)`` (or ``numpy.load(allow_pickle=True)``, ``joblib``/``dill``/``pandas.read_pickle``)
  anywhere in core, models, training, export or service (an AST scan, so comments and strings don't count).
* The API key guards every endpoint except health probes and metrics, on REST, KServe v2 over HTTP and
  gRPC: refused without it (or with a wrong one), accepted with it. Every path the server publishes must
  be classified here, so a new endpoint cannot slip in unguarded.
* The server log never holds a DICOM upload's patient tags or its pixels (success and error paths).
* DICOM the service writes (SEG) carries no patient identifiers by default (``MEDREFINE_ANONYMIZE_DICOM``
  on); a request may opt out, and the setting can turn the default off.
"""

from __future__ import annotations

import ast
import asyncio
import base64
import io
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
import pydicom
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tests.support.bad_inputs import assert_no_leak, dicom_bytes

pytestmark = pytest.mark.timeout(300)

REPO_ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("core", "models", "training", "export", "service")

# ----------------------------------------------------------------------------------------------------------
# Safe deserialisation only
# ----------------------------------------------------------------------------------------------------------

_PICKLE_LOADERS = {("pickle", "load"), ("pickle", "loads"), ("cPickle", "load"), ("cPickle", "loads"),
                   ("_pickle", "load"), ("_pickle", "loads"), ("dill", "load"), ("dill", "loads"),
                   ("joblib", "load"), ("pd", "read_pickle"), ("pandas", "read_pickle"),
                   ("torch", "load"), ("np", "load"), ("numpy", "load")}


def _dotted(node: ast.AST) -> tuple[str, str] | None:
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        return node.value.id, node.attr
    return None


def _keyword_is(call: ast.Call, name: str, value: object) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value for k in call.keywords)


def unsafe_loads(source: str, filename: str) -> list[str]:
    """``file:line call`` for every unsafe deserialising call in ``source``."""
    hits = []
    tree = ast.parse(source, filename)
    imported_from_pickle = {alias.asname or alias.name for node in ast.walk(tree)
                            if isinstance(node, ast.ImportFrom) and node.module in ("pickle", "_pickle", "dill")
                            for alias in node.names}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        where = f"{filename}:{node.lineno}"
        if name == ("torch", "load"):
            if not _keyword_is(node, "weights_only", True):
                hits.append(f"{where} torch.load without weights_only=True")
        elif name in (("np", "load"), ("numpy", "load")):
            if _keyword_is(node, "allow_pickle", True):
                hits.append(f"{where} numpy.load(allow_pickle=True)")
        elif name in _PICKLE_LOADERS:
            hits.append(f"{where} {name[0]}.{name[1]}")
        elif isinstance(node.func, ast.Name) and node.func.id in imported_from_pickle & {"load", "loads"}:
            hits.append(f"{where} {node.func.id} (from pickle)")
    return hits


def test_scanner_finds_what_it_must():
    bad = (
        "import torch, pickle\nfrom pickle import loads\nimport numpy as np\n"
        "torch.load(p)\ntorch.load(p, weights_only=False)\npickle.load(f)\nloads(b)\nnp.load(p, allow_pickle=True)\n"
    )
    assert len(unsafe_loads(bad, "bad.py")) == 5
    good = "import torch\nimport numpy as np\ntorch.load(p, map_location='cpu', weights_only=True)\nnp.load(p)\n"
    assert unsafe_loads(good, "good.py") == []


def test_no_unsafe_deserialisation_in_the_code_base():
    files = [path for package in SCANNED for path in sorted((REPO_ROOT / package).rglob("*.py"))]
    assert len(files) > 30, "the packages to scan were not found"
    hits = [hit for path in files
            for hit in unsafe_loads(path.read_text(encoding="utf-8"), str(path.relative_to(REPO_ROOT)))]
    assert hits == [], "unsafe deserialisation:\n" + "\n".join(hits)


# ----------------------------------------------------------------------------------------------------------
# The API key on every protocol
# ----------------------------------------------------------------------------------------------------------

_IMAGE = (np.indices((32, 32)).sum(axis=0) * 4 % 256).astype(np.uint8)


def _png() -> bytes:
    from tests.support.bad_inputs import pil_bytes

    return pil_bytes(_IMAGE, "PNG")


def _infer_json() -> dict:
    return {"inputs": [{"name": "IMAGE", "datatype": "UINT8", "shape": [32, 32], "data": _IMAGE.ravel().tolist()}]}


# (method, path, request kwargs) of every HTTP endpoint; PUBLIC ones need no key.
PUBLIC_HTTP = [("GET", "/livez", {}), ("GET", "/healthz", {}), ("GET", "/readyz", {}), ("GET", "/metrics", {}),
               ("GET", "/v2/health/live", {}), ("GET", "/v2/health/ready", {}),
               ("GET", "/v2/models/segment/ready", {})]
PROTECTED_HTTP = [
    ("POST", "/segment", {"files": {"file": ("k.png", "PNG", "image/png")}}),
    ("POST", "/refine", {"files": {"file": ("k.png", "PNG", "image/png")}, "data": {"box": "[4, 4, 20, 20]"}}),
    ("POST", "/synthesize", {"files": {"file": ("k.png", "PNG", "image/png")}}),
    ("POST", "/generate", {"json": {"prompt": "chest x-ray", "modality": "chest_xray", "steps": 2}}),
    ("GET", "/v2", {}),
    ("GET", "/v2/models/segment", {}),
    ("POST", "/v2/models/segment/infer", {"json": "INFER"}),
    ("GET", "/v2/models/generate", {}),
]
# Static documentation: the web page and the API description hold no data and call the API with the key.
STATIC = {"/", "/docs.json", "/ui", "/ui/"}


def _kwargs(spec: dict) -> dict:
    out = {}
    for key, value in spec.items():
        if key == "files":
            out["files"] = {k: (v[0], _png(), v[2]) for k, v in value.items()}
        elif key == "json":
            out["json"] = _infer_json() if value == "INFER" else value
        else:
            out[key] = value
    return out


def test_every_published_path_is_classified(live_server):
    published = set(httpx.get(live_server.url + "/docs.json", timeout=30).json()["paths"])
    classified = {path for _, path, _ in PUBLIC_HTTP + PROTECTED_HTTP} | STATIC
    assert published <= classified, (
        f"unclassified endpoints (guard them or list them as public): {published - classified}"
    )


@pytest.mark.parametrize(("method", "path", "spec"), PROTECTED_HTTP, ids=[p for _, p, _ in PROTECTED_HTTP])
def test_http_endpoint_needs_the_key(live_server, method, path, spec):
    for headers in ({}, {"Authorization": "Bearer not-the-key-123"}, {"X-API-Key": "not-the-key-123"},
                    {"Authorization": f"Basic {live_server.api_key}"}):
        refused = httpx.request(method, live_server.url + path, headers=headers, timeout=60, **_kwargs(spec))
        assert refused.status_code == 401, (headers, refused.text)
        assert "API key" in refused.json()["error"]
        assert_no_leak(refused.text)
    for headers in ({"Authorization": f"Bearer {live_server.api_key}"}, {"X-API-Key": live_server.api_key}):
        accepted = httpx.request(method, live_server.url + path, headers=headers, timeout=60, **_kwargs(spec))
        assert accepted.status_code == 200, (headers, accepted.text)


@pytest.mark.parametrize(("method", "path", "spec"), PUBLIC_HTTP, ids=[p for _, p, _ in PUBLIC_HTTP])
def test_health_and_metrics_need_no_key(live_server, method, path, spec):
    response = httpx.request(method, live_server.url + path, timeout=30)
    assert response.status_code == 200, response.text


def _rpc(server, name: str, request, metadata=()):
    with grpc.insecure_channel(server.grpc_address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        return getattr(stub, name)(request, timeout=60, metadata=list(metadata))


def _grpc_infer_request():
    request = service_pb2.ModelInferRequest(model_name="segment")
    request.inputs.add(name="IMAGE", datatype="UINT8", shape=[32, 32])
    request.raw_input_contents.append(_IMAGE.tobytes())
    return request


PROTECTED_RPCS = [("ServerMetadata", service_pb2.ServerMetadataRequest),
                  ("ModelMetadata", lambda: service_pb2.ModelMetadataRequest(name="segment")),
                  ("ModelInfer", _grpc_infer_request)]
PUBLIC_RPCS = [("ServerLive", service_pb2.ServerLiveRequest), ("ServerReady", service_pb2.ServerReadyRequest),
               ("ModelReady", lambda: service_pb2.ModelReadyRequest(name="segment"))]


def test_grpc_needs_the_key_except_health(live_server):
    for name, make in PROTECTED_RPCS:
        for metadata in ((), (("authorization", "Bearer not-the-key-123"),), (("x-api-key", "nope-nope-1"),)):
            with pytest.raises(grpc.RpcError) as info:
                _rpc(live_server, name, make(), metadata)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, (name, metadata)
            assert "API key" in info.value.details()
        for metadata in ((("authorization", f"Bearer {live_server.api_key}"),), (("x-api-key", live_server.api_key),)):
            assert _rpc(live_server, name, make(), metadata) is not None
    for name, make in PUBLIC_RPCS:
        reply = _rpc(live_server, name, make())
        assert getattr(reply, {"ServerLive": "live"}.get(name, "ready")) is True


# ----------------------------------------------------------------------------------------------------------
# No patient data or pixels in the server log; anonymised DICOM output
# ----------------------------------------------------------------------------------------------------------

PATIENT_NAME = "Quixotewald^Marisabel"
PATIENT_ID = "PID-7D41C9E2"


def _secret_dicom(seed: int = 0, *, pixels: bool = True) -> tuple[bytes, np.ndarray]:
    values = (np.random.default_rng(seed).random((48, 40)) * 255).astype(np.uint8)
    return dicom_bytes(pixels=values if pixels else None, patient_name=PATIENT_NAME, patient_id=PATIENT_ID), values


def _base64_fragments(raw: bytes, length: int = 24) -> list[str]:
    """Base64 text any encoding of ``raw`` would contain, whatever its alignment in the encoded stream."""
    middle = len(raw) // 2
    return [base64.b64encode(raw[middle + shift: middle + shift + 3 * length])[4:-4].decode() for shift in range(3)]


def test_logs_hold_no_patient_tags_or_pixels(live_server):
    data, pixels = _secret_dicom(seed=1)
    before = len(live_server.log())
    files = {"file": (f"{PATIENT_NAME}.dcm", data, "application/dicom")}
    headers = live_server.headers()
    with live_server.client(timeout=60) as client:
        answers = [
            client.post("/segment", files=files, data={"dicom_seg": "true", "anonymize": "false",
                                                       "outputs": "mask,image,probability"}),
            client.post("/segment", files=files, data={"threshold": PATIENT_NAME}),  # BentoML validation error
            client.post("/segment", files=files, data={"gate": PATIENT_NAME}),
            client.post("/refine", files=files, data={"box": "[30, 10, 20, 20]"}),  # pipeline prompt error
            client.post("/segment", files={"file": ("x.dcm", _secret_dicom(pixels=False)[0], "application/dicom")}),
            client.post("/segment", files={"file": ("cut.dcm", data[: len(data) - 500], "application/dicom")}),
        ]
    oip = httpx.post(live_server.url + "/v2/models/segment/infer", headers=headers, timeout=60,
                     json={"id": PATIENT_NAME, "inputs": [{"name": "IMAGE", "datatype": "UINT8", "shape": [48, 40],
                                                           "data": pixels.ravel().tolist()}]})
    assert [a.status_code for a in answers] == [200, 400, 400, 400, 400, 400], [a.text[:200] for a in answers]
    assert oip.status_code == 200
    for answer in answers:  # nor do the answers echo them (the SEG is base64 and keeps them on purpose here)
        assert PATIENT_NAME not in answer.text and PATIENT_ID not in answer.text
    assert oip.json()["id"] == PATIENT_NAME  # KServe v2 echoes the client's request id to that client
    time.sleep(1.0)  # the server flushes its access log after answering
    log = live_server.log()[before:]
    assert "/segment" in log and "status=400" in log  # the requests above were logged ...
    for secret in (PATIENT_NAME, "Quixotewald", "Marisabel", PATIENT_ID):
        assert secret not in log, f"{secret!r} in the server log"
    raw = pixels.tobytes()
    for fragment in _base64_fragments(raw) + _base64_fragments(data):
        assert fragment not in log, "pixel data (base64) in the server log"
    assert raw[100:140].decode("latin-1") not in log
    assert "input_value" not in log and "Traceback" not in log


def _seg_patient(body: dict) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(base64.b64decode(body["dicom_seg_base64"])))


def test_dicom_seg_is_anonymised_by_default_and_on_request(live_server):
    data, _ = _secret_dicom(seed=2)
    files = {"file": ("scan.dcm", data, "application/dicom")}
    with live_server.client(timeout=60) as client:
        default = client.post("/segment", files=files, data={"dicom_seg": "true"})
        asked = client.post("/segment", files=files, data={"dicom_seg": "true", "anonymize": "true"})
        kept = client.post("/segment", files=files, data={"dicom_seg": "true", "anonymize": "false"})
        lonely = client.post("/segment", files=files, data={"anonymize": "true"})
    for response in (default, asked, kept):
        assert response.status_code == 200, response.text
        assert PATIENT_NAME not in response.text  # only ever inside the encoded SEG
    for response in (default, asked):
        seg = _seg_patient(response.json())
        assert str(seg.PatientName) == "" and seg.PatientID == "" and seg.PatientBirthDate == ""
        assert seg.PatientIdentityRemoved == "YES"
        assert PATIENT_NAME.encode() not in base64.b64decode(response.json()["dicom_seg_base64"])
    seg = _seg_patient(kept.json())
    assert str(seg.PatientName) == PATIENT_NAME and seg.PatientID == PATIENT_ID
    assert lonely.status_code == 400 and lonely.json()["field"] == "anonymize"


def test_anonymize_default_follows_the_setting(service_artifacts, tmp_path):
    """``MEDREFINE_ANONYMIZE_DICOM=0`` turns the default off (the request can still ask for it)."""
    from service import rest
    from service.runtime import ServiceRuntime
    from service.settings import ServiceSettings

    assert ServiceSettings.from_env({}).anonymize_dicom is True
    settings = ServiceSettings.from_env({"MEDREFINE_ANONYMIZE_DICOM": "0"}, artifacts=service_artifacts.art_dir,
                                        grpc_port=0, intra_op_threads=1)
    assert settings.anonymize_dicom is False
    upload = tmp_path / "scan.dcm"
    upload.write_bytes(_secret_dicom(seed=3)[0])
    runtime = ServiceRuntime.load(settings)

    async def scenario():
        await runtime.start()
        try:
            default = await rest.segment(runtime, upload, dicom_seg=True)
            asked = await rest.segment(runtime, upload, dicom_seg=True, anonymize=True)
        finally:
            await runtime.stop(10)
        return default, asked

    default, asked = asyncio.run(scenario())
    assert str(_seg_patient(default).PatientName) == PATIENT_NAME
    assert str(_seg_patient(asked).PatientName) == ""
