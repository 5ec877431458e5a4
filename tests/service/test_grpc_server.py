"""service.grpc_server: KServe v2 over gRPC with the stock tritonclient.grpc client.

The server runs on a random loopback port against the real ServiceRuntime over tiny exported artifacts
(tests/support/artifact_factory.py), both on one event loop in a background thread. Outputs are compared with
the pipeline called directly on the same image.
"""

from __future__ import annotations

import asyncio
import threading

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from core.imageio import to_uint8
from inference.pipeline import SegmentationPipeline
from service.errors import NotReady, QueueFullError, RequestTimeoutError
from service.grpc_server import start_grpc_server
from service.metrics import REGISTRY
from service.oip_models import ModelRegistry, SegmentModel
from service.runtime import ServiceRuntime
from service.settings import ServiceSettings
from tests.support.artifact_factory import phantom_images, shared_tiny_artifacts
from tests.support.oip_checks import CaptionModel, assert_segment_outputs, expected_segment
from tests.support.runtime_doubles import FailingRuntime

pytestmark = pytest.mark.timeout(180)

API_KEY = "grpc-test-key-123"
SMALL_UPLOAD = 64 * 1024


class LoopGrpc:
    """A runtime (or runtime double) and its gRPC server on an event loop in a background thread."""

    def __init__(self, runtime, *, start_runtime: bool = True, registry: ModelRegistry | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runtime = runtime
        if start_runtime:
            self.call(runtime.start())
        self.handle = self.call(start_grpc_server(runtime, "127.0.0.1", 0, registry=registry))
        self.url = f"127.0.0.1:{self.handle.port}"

    def call(self, coroutine, timeout: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        self.call(self.handle.stop(1.0))
        if hasattr(self.runtime, "stop"):
            self.call(self.runtime.stop(10))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> SegmentationPipeline:
    return SegmentationPipeline.from_artifacts(shared_tiny_artifacts(tmp_path_factory), backend="onnxruntime")


@pytest.fixture(scope="module")
def server(pipeline):
    served = LoopGrpc(ServiceRuntime(ServiceSettings(artifacts=pipeline.artifacts.root, max_latency_ms=1.0), pipeline))
    yield served
    served.close()


@pytest.fixture(scope="module")
def keyed_server(pipeline):
    settings = ServiceSettings(
        artifacts=pipeline.artifacts.root, max_latency_ms=1.0, api_key=API_KEY, max_upload_bytes=SMALL_UPLOAD
    )
    served = LoopGrpc(ServiceRuntime(settings, pipeline))
    yield served
    served.close()


@pytest.fixture(scope="module")
def phantom() -> np.ndarray:
    """A 40 x 56 phantom as uint8 gray."""
    return to_uint8(phantom_images([(40, 56)], seed=5)[0])


def _image_input(array: np.ndarray, datatype: str = "UINT8", name: str = "IMAGE") -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor




def test_health_and_metadata_with_stock_client(server):
    client = grpcclient.InferenceServerClient(server.url)
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "medrefine" and meta["extensions"] == ["binary_tensor_data"]
    assert client.is_model_ready("segment")
    model = client.get_model_metadata("segment", as_json=True)
    assert model["versions"] == [server.runtime.model_version]
    assert model["inputs"] == [{"name": "IMAGE", "datatype": "UINT8", "shape": ["-1", "-1", "3"]}]  # int64 as JSON
    assert [o["name"] for o in model["outputs"]] == ["MASK", "PROBABILITY", "BOX", "IOU", "NEEDS_REVIEW",
                                                      "LESION_FOUND"]
    with pytest.raises(InferenceServerException) as info:
        client.get_model_metadata("nope")
    assert info.value.status() == "StatusCode.NOT_FOUND" and "unknown model 'nope'" in info.value.message()


def test_infer_raw_contents_with_stock_client_matches_pipeline(server, pipeline, phantom):
    client = grpcclient.InferenceServerClient(server.url)
    result = client.infer(
        "segment", [_image_input(phantom)], request_id="g-1", model_version=server.runtime.model_version
    )
    response = result.get_response()
    assert response.id == "g-1" and response.model_name == "segment"
    assert len(response.raw_output_contents) == 6
    outputs = {
        name: result.as_numpy(name) for name in ("MASK", "PROBABILITY", "BOX", "IOU", "NEEDS_REVIEW", "LESION_FOUND")
    }
    assert_segment_outputs(outputs, expected_segment(pipeline, phantom), phantom.shape)


def test_infer_over_a_mebibyte_matches_pipeline(server, pipeline):
    """An image and answer larger than what the server decodes and encodes on its event loop (1 MiB)."""
    image = to_uint8(phantom_images([(800, 1400)], seed=7)[0])  # 1.12 MB raw; PROBABILITY answer 4.5 MB
    client = grpcclient.InferenceServerClient(server.url, channel_args=[("grpc.max_receive_message_length", -1)])
    result = client.infer("segment", [_image_input(image)])
    outputs = {name: result.as_numpy(name) for name in ("MASK", "PROBABILITY", "BOX", "IOU", "NEEDS_REVIEW")}
    assert_segment_outputs(outputs, expected_segment(pipeline, image), image.shape)


def test_infer_requested_outputs_and_threshold(server, pipeline, phantom):
    client = grpcclient.InferenceServerClient(server.url)
    outputs = [grpcclient.InferRequestedOutput("PROBABILITY"), grpcclient.InferRequestedOutput("MASK")]
    result = client.infer("segment", [_image_input(phantom)], outputs=outputs, parameters={"threshold": 0.25})
    assert [o.name for o in result.get_response().outputs] == ["PROBABILITY", "MASK"]
    expected = expected_segment(pipeline, phantom, threshold=0.25)
    np.testing.assert_allclose(result.as_numpy("PROBABILITY"), expected.probability, atol=1e-6)
    np.testing.assert_array_equal(result.as_numpy("MASK"), (result.as_numpy("PROBABILITY") > 0.25).astype(np.uint8))


def test_typed_contents_are_accepted(server, pipeline, phantom):
    request = service_pb2.ModelInferRequest(model_name="segment")
    tensor = request.inputs.add(name="IMAGE", datatype="UINT8", shape=list(phantom.shape))
    tensor.contents.uint_contents.extend(phantom.reshape(-1).tolist())
    with grpc.insecure_channel(server.url) as channel:
        reply = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
    names = [o.name for o in reply.outputs]
    mask = np.frombuffer(reply.raw_output_contents[names.index("MASK")], dtype=np.uint8).reshape(phantom.shape)
    np.testing.assert_array_equal(mask, expected_segment(pipeline, phantom).mask)



def test_a_new_model_is_served_without_transport_changes(pipeline):
    runtime = ServiceRuntime(ServiceSettings(artifacts=pipeline.artifacts.root), pipeline)
    served = LoopGrpc(runtime, registry=ModelRegistry([SegmentModel(), CaptionModel()]))
    try:
        client = grpcclient.InferenceServerClient(served.url)
        inputs = [grpcclient.InferInput("PROMPT", [1], "BYTES"), grpcclient.InferInput("MODALITY", [1], "BYTES")]
        inputs[0].set_data_from_numpy(np.array([b"lesion\x00x"], dtype=object))
        inputs[1].set_data_from_numpy(np.array([b"us"], dtype=object))
        result = client.infer("caption", inputs)
        typed = service_pb2.ModelInferRequest(model_name="caption")
        for name, value in (("PROMPT", b"ab"), ("MODALITY", b"ct")):
            typed.inputs.add(name=name, datatype="BYTES", shape=[1]).contents.bytes_contents.append(value)
        with grpc.insecure_channel(served.url) as channel:
            reply = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(typed, timeout=30)
    finally:
        served.close()
    assert result.as_numpy("CAPTION").tolist() == [b"us:LESION\x00X"]
    np.testing.assert_array_equal(result.as_numpy("IMAGE"), np.full((8, 2), 8, dtype=np.uint8))
    assert reply.raw_output_contents[1] == b"\x05\x00\x00\x00ct:AB"  # BYTES out: 4-byte length prefix


def _raw_request(shape, datatype="UINT8", raw=b"", name="IMAGE", **params) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name="segment")
    request.inputs.add(name=name, datatype=datatype, shape=list(shape))
    request.raw_input_contents.append(raw)
    for key, value in params.items():
        request.parameters[key].double_param = value
    return request


@pytest.mark.parametrize(
    ("make_request", "needle"),
    [
        (lambda img: _raw_request(img.shape, raw=img.tobytes(), name="PIXELS"), "unknown input 'PIXELS'"),
        (lambda img: _raw_request(img.shape, "FP32", img.astype(np.float32).tobytes()),
         "input 'IMAGE' has datatype FP32, model 'segment' expects UINT8"),
        (lambda img: _raw_request((1, *img.shape), raw=img.tobytes()), "input 'IMAGE' has shape [1, 40, 56]"),
        (lambda img: _raw_request(img.shape, raw=img.tobytes()[:-1]),
         "tensor 'IMAGE' has 2239 bytes of data but shape [40, 56] of UINT8 needs 2240"),
        (lambda img: _raw_request((2,), "FP32", np.array([0.5, np.nan], np.float32).tobytes()),
         "tensor 'IMAGE' (FP32) holds a non-finite value (nan) at flat index 1"),
        (lambda img: _raw_request(img.shape, raw=img.tobytes(), threshold=float("nan")),
         "parameter 'threshold' must be a finite number"),
    ],
)
def test_invalid_requests_are_invalid_argument(server, phantom, make_request, needle):
    with grpc.insecure_channel(server.url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(make_request(phantom), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in info.value.details()


def test_invalid_requests_through_stock_client(server, phantom):
    client = grpcclient.InferenceServerClient(server.url)
    with pytest.raises(InferenceServerException) as info:
        client.infer("segment", [_image_input(phantom.astype(np.float32), "FP32")])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT" and "expects UINT8" in info.value.message()
    mixed = _raw_request(phantom.shape, raw=phantom.tobytes())
    mixed.inputs[0].contents.uint_contents.extend([1])
    with grpc.insecure_channel(server.url) as channel:
        with pytest.raises(grpc.RpcError) as rpc:
            service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(mixed, timeout=30)
    assert rpc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "use one" in rpc.value.details()


def test_api_key_and_message_size_limit(keyed_server, phantom):
    client = grpcclient.InferenceServerClient(keyed_server.url)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("segment")
    for headers in (None, {"authorization": "Bearer wrong-key-000"}):
        with pytest.raises(InferenceServerException) as info:
            client.infer("segment", [_image_input(phantom)], headers=headers)
        assert info.value.status() == "StatusCode.UNAUTHENTICATED"
        assert "API key" in info.value.message()
    result = client.infer("segment", [_image_input(phantom)], headers={"authorization": f"Bearer {API_KEY}"})
    assert result.as_numpy("MASK").shape == phantom.shape
    result = client.infer("segment", [_image_input(phantom)], headers={"x-api-key": API_KEY})
    assert result.as_numpy("IOU").shape == (1,)
    big = np.zeros((300, 300), dtype=np.uint8)  # 90 000 bytes > 64 KiB
    with pytest.raises(InferenceServerException) as info:
        client.infer("segment", [_image_input(big)], headers={"x-api-key": API_KEY})
    assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED"


def test_requests_are_counted_with_protocol_grpc(server, phantom):
    labels = {"endpoint": "ModelInfer", "protocol": "grpc", "model": "segment"}
    before_ok = REGISTRY.get_sample_value("medrefine_requests_total", {**labels, "status": "200"}) or 0.0
    before_bad = REGISTRY.get_sample_value("medrefine_requests_total", {**labels, "status": "400"}) or 0.0
    client = grpcclient.InferenceServerClient(server.url)
    client.infer("segment", [_image_input(phantom)])
    with pytest.raises(InferenceServerException):
        client.infer("segment", [_image_input(phantom, name="WRONG")])
    assert REGISTRY.get_sample_value("medrefine_requests_total", {**labels, "status": "200"}) == before_ok + 1
    assert REGISTRY.get_sample_value("medrefine_requests_total", {**labels, "status": "400"}) == before_bad + 1


@pytest.mark.parametrize(
    ("error", "code", "retry_after"),
    [
        (QueueFullError(retry_after=3.0), grpc.StatusCode.UNAVAILABLE, "3"),
        (NotReady("draining"), grpc.StatusCode.UNAVAILABLE, "1"),
        (RequestTimeoutError(), grpc.StatusCode.DEADLINE_EXCEEDED, None),
        (RuntimeError("boom"), grpc.StatusCode.INTERNAL, None),
    ],
)
def test_runtime_errors_map_to_status_codes(error, code, retry_after):
    served = LoopGrpc(FailingRuntime(error), start_runtime=False)
    try:
        with grpc.insecure_channel(served.url) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(_raw_request((2, 2), raw=bytes(4)), timeout=30)
    finally:
        served.close()
    assert info.value.code() == code
    trailing = dict(info.value.trailing_metadata() or ())
    assert trailing.get("retry-after") == retry_after
    if code == grpc.StatusCode.INTERNAL:
        assert info.value.details() == "internal server error (RuntimeError)"  # no internals leak
    else:
        assert info.value.details() == error.message


def test_stop_closes_the_port(pipeline):
    served = LoopGrpc(ServiceRuntime(ServiceSettings(artifacts=pipeline.artifacts.root), pipeline))
    client = grpcclient.InferenceServerClient(served.url)
    assert client.is_server_live()
    served.close()
    with pytest.raises(InferenceServerException):
        grpcclient.InferenceServerClient(served.url).is_server_live(client_timeout=2.0)
