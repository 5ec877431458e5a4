"""service.oip_http: KServe v2 over HTTP with the stock tritonclient.http client and plain httpx.

The app runs against the real ServiceRuntime over tiny exported artifacts (tests/support/artifact_factory.py):
under uvicorn on a loopback port (the stock client needs a socket), and in-process through httpx's
ASGITransport. Outputs are compared with the pipeline called directly on the same image, so the whole
path client -> codec -> registry -> batcher -> pipeline -> codec -> client is checked, not just shapes.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import threading
import time

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient
import uvicorn
from tritonclient.utils import InferenceServerException

from core.imageio import LUMA_WEIGHTS, to_uint8
from inference.pipeline import SegmentationPipeline
from service.errors import QueueFullError, RequestTimeoutError
from service.metrics import REGISTRY
from service.oip_http import create_oip_app
from service.oip_models import ModelRegistry, SegmentModel
from service.runtime import ServiceRuntime
from service.settings import ServiceSettings
from tests.support.artifact_factory import phantom_images, shared_tiny_artifacts
from tests.support.oip_checks import CaptionModel, assert_segment_outputs, expected_segment
from tests.support.runtime_doubles import FailingRuntime

pytestmark = pytest.mark.timeout(180)

API_KEY = "oip-http-test-key"
SMALL_UPLOAD = 64 * 1024


class LoopServer:
    """A ServiceRuntime and the OIP app under uvicorn, both on one event loop in a background thread."""

    def __init__(
        self, settings: ServiceSettings, pipeline: SegmentationPipeline, registry: ModelRegistry | None = None
    ) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runtime = ServiceRuntime(settings, pipeline)
        self.call(self.runtime.start())
        config = uvicorn.Config(
            create_oip_app(self.runtime, registry=registry, prefix="/v2"),
            host="127.0.0.1",
            port=0,
            log_level="warning",
            lifespan="off",
        )
        self.server = uvicorn.Server(config)
        self.serving = asyncio.run_coroutine_threadsafe(self.server.serve(), self.loop)
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and not self.serving.done(), "uvicorn did not start"
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"127.0.0.1:{self.port}"

    def call(self, coroutine, timeout: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        self.server.should_exit = True
        self.serving.result(30)
        self.call(self.runtime.stop(10))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> SegmentationPipeline:
    return SegmentationPipeline.from_artifacts(shared_tiny_artifacts(tmp_path_factory), backend="onnxruntime")


@pytest.fixture(scope="module")
def server(pipeline):
    served = LoopServer(ServiceSettings(artifacts=pipeline.artifacts.root, max_latency_ms=1.0), pipeline)
    yield served
    served.close()


@pytest.fixture(scope="module")
def keyed_server(pipeline):
    settings = ServiceSettings(
        artifacts=pipeline.artifacts.root, max_latency_ms=1.0, api_key=API_KEY, max_upload_bytes=SMALL_UPLOAD
    )
    served = LoopServer(settings, pipeline)
    yield served
    served.close()


@pytest.fixture(scope="module")
def phantom() -> np.ndarray:
    """A 48 x 40 phantom as uint8 gray (non-square on purpose)."""
    return to_uint8(phantom_images([(48, 40)], seed=3)[0])


def _client(served: LoopServer) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(served.url, network_timeout=60.0)


def _image_input(array: np.ndarray, datatype: str = "UINT8", name: str = "IMAGE", binary: bool = True):
    tensor = httpclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=binary)
    return tensor




# ----------------------------------------------------------------------------------------------------------
# Health and metadata
# ----------------------------------------------------------------------------------------------------------


def test_health_and_metadata_with_stock_client(server):
    client = _client(server)
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "medrefine" and "binary_tensor_data" in meta["extensions"]
    assert client.is_model_ready("segment")
    assert not client.is_model_ready("no_such_model")
    model = client.get_model_metadata("segment")
    version = server.runtime.model_version
    assert model["name"] == "segment" and model["versions"] == [version]
    assert model["inputs"] == [{"name": "IMAGE", "datatype": "UINT8", "shape": [-1, -1, 3]}]
    assert [(o["name"], o["datatype"], o["shape"]) for o in model["outputs"]] == [
        ("MASK", "UINT8", [-1, -1]), ("PROBABILITY", "FP32", [-1, -1]), ("BOX", "FP32", [4]), ("IOU", "FP32", [1]),
        ("NEEDS_REVIEW", "BOOL", [1]), ("LESION_FOUND", "BOOL", [1]),
    ]
    assert client.get_model_metadata("segment", model_version=version)["name"] == "segment"
    assert client.is_model_ready("segment", model_version=version)
    with pytest.raises(InferenceServerException) as info:
        client.get_model_metadata("segment", model_version="not-a-version")
    assert info.value.status() == "404" and "has no version 'not-a-version'" in info.value.message()


# ----------------------------------------------------------------------------------------------------------
# Inference
# ----------------------------------------------------------------------------------------------------------


def test_infer_binary_with_stock_client_matches_pipeline(server, pipeline, phantom):
    result = _client(server).infer("segment", [_image_input(phantom)], request_id="req-7")
    assert result.get_response()["id"] == "req-7"
    assert result.get_response()["model_version"] == server.runtime.model_version
    outputs = {
        name: result.as_numpy(name) for name in ("MASK", "PROBABILITY", "BOX", "IOU", "NEEDS_REVIEW", "LESION_FOUND")
    }
    assert_segment_outputs(outputs, expected_segment(pipeline, phantom), phantom.shape)


def test_infer_rgb_json_input_threshold_and_json_outputs(server, pipeline, phantom):
    rgb = np.stack([phantom, np.roll(phantom, 3, axis=1), 255 - phantom], axis=-1)
    requested = [httpclient.InferRequestedOutput("PROBABILITY", binary_data=False),
                 httpclient.InferRequestedOutput("MASK", binary_data=True)]
    result = _client(server).infer(
        "segment", [_image_input(rgb, binary=False)], outputs=requested, parameters={"threshold": 0.3},
        model_version=server.runtime.model_version, request_compression_algorithm="gzip",
    )
    response = result.get_response()
    assert [o["name"] for o in response["outputs"]] == ["PROBABILITY", "MASK"]
    assert "data" in response["outputs"][0] and "binary_data_size" in response["outputs"][1]["parameters"]
    gray = (rgb.astype(np.float32) @ np.asarray(LUMA_WEIGHTS, np.float32)) / 255.0
    from inference.pipeline import SegmentOptions

    (expected,) = pipeline.segment([gray.astype(np.float32)], SegmentOptions(threshold=0.3))
    probability, mask = result.as_numpy("PROBABILITY"), result.as_numpy("MASK")
    np.testing.assert_allclose(probability, expected.probability, atol=1e-6)
    np.testing.assert_array_equal(mask, (probability > 0.3).astype(np.uint8))
    assert result.as_numpy("BOX") is None  # not requested, not sent


def test_plain_json_request_over_httpx(server, pipeline, phantom):
    document = {
        "id": "plain",
        "inputs": [{"name": "IMAGE", "datatype": "UINT8", "shape": list(phantom.shape), "data": phantom.tolist()}],
    }
    reply = httpx.post(f"http://{server.url}/v2/models/segment/infer", json=document, timeout=60)
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"].startswith("application/json")
    body = reply.json()
    assert body["model_name"] == "segment" and body["id"] == "plain"
    by_name = {o["name"]: o for o in body["outputs"]}
    dtypes = {"MASK": np.uint8, "PROBABILITY": np.float32, "BOX": np.float32, "IOU": np.float32,
              "NEEDS_REVIEW": np.bool_, "LESION_FOUND": np.bool_}
    outputs = {n: np.asarray(o["data"], dtype=dtypes[n]).reshape(o["shape"]) for n, o in by_name.items()}
    assert {n: o["datatype"] for n, o in by_name.items()} == {
        "MASK": "UINT8", "PROBABILITY": "FP32", "BOX": "FP32", "IOU": "FP32", "NEEDS_REVIEW": "BOOL",
        "LESION_FOUND": "BOOL"}
    assert all(isinstance(by_name[n]["data"][0], bool) for n in ("NEEDS_REVIEW", "LESION_FOUND"))  # JSON true/false
    assert_segment_outputs(outputs, expected_segment(pipeline, phantom), phantom.shape)


def test_in_process_asgi_app_on_the_real_runtime(pipeline, phantom):
    async def scenario():
        runtime = ServiceRuntime(ServiceSettings(artifacts=pipeline.artifacts.root, max_latency_ms=1.0), pipeline)
        await runtime.start()
        try:
            transport = httpx.ASGITransport(app=create_oip_app(lambda: runtime))  # mounted-at-/v2 form
            async with httpx.AsyncClient(transport=transport, base_url="http://oip") as client:
                live = await client.get("/health/live")
                meta = await client.get("/")
                document = {"inputs": [{"name": "IMAGE", "datatype": "UINT8", "shape": list(phantom.shape),
                                        "data": phantom.reshape(-1).tolist()}],
                            "outputs": [{"name": "IOU"}, {"name": "MASK", "parameters": {"binary_data": True}}]}
                infer = await client.post("/models/segment/infer", content=json.dumps(document))
        finally:
            await runtime.stop(5)
        return live, meta, infer

    live, meta, infer = asyncio.run(scenario())
    assert live.json() == {"live": True} and meta.json()["name"] == "medrefine"
    assert infer.status_code == 200, infer.text
    header_length = int(infer.headers["inference-header-content-length"])
    result = httpclient.InferResult.from_response_body(infer.content, header_length=header_length)
    expected = expected_segment(pipeline, phantom)
    np.testing.assert_array_equal(result.as_numpy("MASK"), expected.mask)
    np.testing.assert_allclose(result.as_numpy("IOU"), [expected.iou], atol=1e-6)



def test_a_new_model_is_served_without_transport_changes(pipeline):
    registry = ModelRegistry([SegmentModel(), CaptionModel()])
    served = LoopServer(ServiceSettings(artifacts=pipeline.artifacts.root), pipeline, registry)
    try:
        client = _client(served)
        assert client.get_model_metadata("caption")["inputs"][0] == {
            "name": "PROMPT",
            "datatype": "BYTES",
            "shape": [1],
        }
        inputs = [httpclient.InferInput("PROMPT", [1], "BYTES"), httpclient.InferInput("MODALITY", [1], "BYTES")]
        inputs[0].set_data_from_numpy(np.array([b"lesion\x00x"], dtype=object))  # binary, length-prefixed
        inputs[1].set_data_from_numpy(np.array(["us"], dtype=object), binary_data=False)  # JSON string
        result = client.infer("caption", inputs)
    finally:
        served.close()
    assert result.as_numpy("CAPTION").tolist() == [b"us:LESION\x00X"]
    np.testing.assert_array_equal(result.as_numpy("IMAGE"), np.full((8, 2), 8, dtype=np.uint8))


# ----------------------------------------------------------------------------------------------------------
# Client errors
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make_input", "parameters", "needle"),
    [
        (lambda img: _image_input(img, name="IMG"), None, "unknown input 'IMG' for model 'segment'; expected: IMAGE"),
        (
            lambda img: _image_input(img.astype(np.float32), "FP32"),
            None,
            "input 'IMAGE' has datatype FP32, model 'segment' expects UINT8",
        ),
        (lambda img: _image_input(img[None]), None, "input 'IMAGE' has shape [1, 48, 40]"),
        (lambda img: _image_input(np.stack([img] * 4, -1)), None, "expects [-1, -1, 3] or [-1, -1]"),
        (
            lambda img: _image_input(img),
            {"threshold": 1.5},
            "parameter 'threshold' must be a finite number in (0.0, 1.0)",
        ),
        (lambda img: _image_input(img), {"thresold": 0.5}, "unknown parameter 'thresold'"),
    ],
)
def test_invalid_requests_are_400_naming_the_problem(server, phantom, make_input, parameters, needle):
    with pytest.raises(InferenceServerException) as info:
        _client(server).infer("segment", [make_input(phantom)], parameters=parameters)
    assert info.value.status() == "400"
    assert needle in info.value.message()


def test_nan_count_mismatch_and_unknown_model_over_httpx(server):
    url = f"http://{server.url}/v2/models/segment/infer"
    nan = b'{"inputs":[{"name":"IMAGE","datatype":"FP32","shape":[1,2],"data":[0.5, NaN]}]}'
    reply = httpx.post(url, content=nan, timeout=30)
    assert reply.status_code == 400
    assert "tensor 'IMAGE' (FP32) holds a non-finite value (nan) at flat index 1" in reply.json()["error"]
    short = {"inputs": [{"name": "IMAGE", "datatype": "UINT8", "shape": [2, 2], "data": [1, 2, 3]}]}
    reply = httpx.post(url, json=short, timeout=30)
    assert reply.status_code == 400 and "has 3 elements but shape [2, 2] needs 4" in reply.json()["error"]
    reply = httpx.post(f"http://{server.url}/v2/models/nope/infer", json=short, timeout=30)
    assert reply.status_code == 404 and "unknown model 'nope'" in reply.json()["error"]
    reply = httpx.post(url, content=b"{", timeout=30)
    assert reply.status_code == 400 and "not valid JSON" in reply.json()["error"]
    reply = httpx.get(url, timeout=30)
    assert reply.status_code == 405


def test_api_key_and_upload_limit(keyed_server, phantom):
    client = _client(keyed_server)
    assert client.is_server_live() and client.is_server_ready()  # probes need no key
    for headers in (None, {"Authorization": "Bearer wrong-key-123"}):
        with pytest.raises(InferenceServerException) as info:
            client.infer("segment", [_image_input(phantom)], headers=headers)
        assert info.value.status() == "401"
        with pytest.raises(InferenceServerException) as info:
            client.get_model_metadata("segment", headers=headers)
        assert info.value.status() == "401"
    ok = client.infer("segment", [_image_input(phantom)], headers={"Authorization": f"Bearer {API_KEY}"})
    assert ok.as_numpy("MASK").shape == phantom.shape
    ok = client.infer("segment", [_image_input(phantom)], headers={"X-API-Key": API_KEY})
    assert ok.as_numpy("IOU").shape == (1,)
    big = np.zeros((300, 300), dtype=np.uint8)  # 90 000 bytes > 64 KiB
    with pytest.raises(InferenceServerException) as info:
        client.infer("segment", [_image_input(big)], headers={"X-API-Key": API_KEY})
    assert info.value.status() == "413" and "max_upload_bytes" in info.value.message()
    bomb = gzip.compress(json.dumps({"inputs": [{"name": "IMAGE", "datatype": "UINT8", "shape": [300, 300],
                                                 "data": [0] * 90_000}]}).encode())
    assert len(bomb) < SMALL_UPLOAD
    reply = httpx.post(f"http://{keyed_server.url}/v2/models/segment/infer", content=bomb, timeout=30,
                       headers={"Content-Encoding": "gzip", "X-API-Key": API_KEY})
    assert reply.status_code == 413 and "decompressed request body exceeds" in reply.json()["error"]


def test_requests_are_counted_with_protocol_oip_http(server, phantom):
    labels = {"endpoint": "/v2/models/{model}/infer", "protocol": "oip-http", "model": "segment"}
    before_ok = REGISTRY.get_sample_value("medrefine_requests_total", {**labels, "status": "200"}) or 0.0
    before_bad = REGISTRY.get_sample_value("medrefine_requests_total", {**labels, "status": "400"}) or 0.0
    client = _client(server)
    client.infer("segment", [_image_input(phantom)])
    with pytest.raises(InferenceServerException):
        client.infer("segment", [_image_input(phantom, name="WRONG")])
    assert REGISTRY.get_sample_value("medrefine_requests_total", {**labels, "status": "200"}) == before_ok + 1
    assert REGISTRY.get_sample_value("medrefine_requests_total", {**labels, "status": "400"}) == before_bad + 1


# ----------------------------------------------------------------------------------------------------------
# Runtime failures -> status codes (a runtime double raising what the real batcher raises under load)
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "status", "retry_after"),
    [(QueueFullError(retry_after=2.4), 503, "2"), (RequestTimeoutError(), 504, None)],
)
def test_runtime_errors_map_to_status_codes(error, status, retry_after):
    app = create_oip_app(FailingRuntime(error), prefix="/v2")
    document = {"inputs": [{"name": "IMAGE", "datatype": "UINT8", "shape": [2, 2], "data": [0, 1, 2, 3]}]}

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://oip") as client:
            return await client.post("/v2/models/segment/infer", json=document)

    reply = asyncio.run(scenario())
    assert reply.status_code == status and reply.json()["error"] == error.message
    assert reply.headers.get("retry-after") == retry_after


def test_not_built_runtime_is_live_but_not_ready():
    app = create_oip_app(lambda: None, prefix="/v2")

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://oip") as client:
            return [await client.get(path) for path in ("/v2/health/live", "/v2/health/ready", "/v2")]

    live, ready, meta = asyncio.run(scenario())
    assert live.status_code == 200 and live.json() == {"live": True}
    assert ready.status_code == 503 and "not built yet" in ready.json()["error"]
    assert meta.status_code == 503
