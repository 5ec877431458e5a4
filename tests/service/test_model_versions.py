"""Serving any registered version (#17) on a real server: REST ``model=tiny:2``, OIP
``/v2/models/segment/versions/2/infer`` and gRPC ``model_version "2"`` answer with version 2's masks; unknown
versions are 404 naming the field; at most K versions stay loaded (production pinned); promoting and rolling
back under load fails no request. v1 and v2 are tiny random models of two seeds, exported to ONNX."""

from __future__ import annotations

import threading
import time

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from core.imageio import decode_image, encode_png
from inference.pipeline import SegmentationPipeline
from medplatform.context import open_platform
from tests.service.test_service_http import png_array
from tests.support.artifact_factory import make_tiny_run, phantom_images, session_tiny_artifacts
from tests.support.service_fixtures import ServerProcess, start_server

NAME = "tiny"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A server over tiny v1 (seed 0, registered at start as ``tiny`` v1 = production) and the same
    registry opened here, with v2 (seed 1) registered."""
    from export.onnx_export import export_artifacts

    v1 = session_tiny_artifacts(tmp_path_factory)
    root = tmp_path_factory.mktemp("model_versions")
    run2 = make_tiny_run(root / "run2", seed=1)
    art2 = root / "art2"
    export_artifacts(run2, art2)
    work = root / "server"
    server = start_server(v1.art_dir, work, env={"MEDREFINE_MODEL_NAME": NAME, "MEDREFINE_MAX_LOADED_VERSIONS": "2",
                                                 "MEDREFINE_DATA_DIR": str(work / "var")})
    try:
        platform = open_platform({"MEDREFINE_DATA_DIR": str(work / "var")}, bentoml_home=work / "bentoml")
        registry = platform.registry
        assert registry.resolve(NAME, None).version == 1  # the server registered its artifacts
        assert registry.register(run2, art2, name=NAME).version == 2
        pipelines = {v: SegmentationPipeline.from_artifacts(d, "onnxruntime", intra_op_threads=1)
                     for v, d in ((1, v1.art_dir), (2, art2))}
        yield server, registry, pipelines, (run2, art2)
    finally:
        server.stop()


def _phantom_u8() -> np.ndarray:
    (image,) = phantom_images([(96, 96)], seed=21)
    return np.round(image * 255).astype(np.uint8)


def _offline_mask(pipeline: SegmentationPipeline, png: bytes) -> np.ndarray:
    (result,) = pipeline.segment([decode_image(png).pixels])
    return result.mask.astype(np.uint8)


def _rest(server: ServerProcess, png: bytes, model: str | None = None, client: httpx.Client | None = None):
    data = {"outputs": "mask"} | ({"model": model} if model is not None else {})
    if client is not None:
        return client.post("/segment", files={"file": ("p.png", png, "image/png")}, data=data)
    with server.client() as own:
        return own.post("/segment", files={"file": ("p.png", png, "image/png")}, data=data)


def _grpc_headers(server: ServerProcess) -> dict[str, str]:
    return {key.lower(): value for key, value in server.headers().items()}  # gRPC metadata keys are lowercase


def _loaded(server: ServerProcess) -> list[str]:
    return httpx.get(server.url + "/readyz", timeout=30).json()["loaded_versions"]


def test_rest_oip_and_grpc_choose_the_version(setup):
    server, _, pipelines, _ = setup
    u8 = _phantom_u8()
    png = encode_png(u8)
    expected = {v: _offline_mask(p, png) for v, p in pipelines.items()}
    assert not np.array_equal(expected[1], expected[2]), "the two versions must segment differently"

    # REST: no model -> production (v1); tiny:2 and tiny@production pick theirs.
    for model, version in ((None, 1), ("tiny:2", 2), ("tiny@production", 1), ("tiny:1", 1), ("tiny", 1)):
        response = _rest(server, png, model)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model"]["version"] == f"tiny:{version}", model
        assert np.array_equal((png_array(body["mask_png_base64"]) > 127).astype(np.uint8), expected[version]), model

    # OIP over HTTP with the stock client: the protocol's own versions are the registry's numbers.
    http = httpclient.InferenceServerClient(f"127.0.0.1:{server.port}", network_timeout=120)
    try:
        metadata = http.get_model_metadata("segment", headers=server.headers())
        assert metadata["versions"] == ["1", "2"]  # production first
        for version in ("2", "1", ""):
            tensor = httpclient.InferInput("IMAGE", list(u8.shape), "UINT8")
            tensor.set_data_from_numpy(u8)
            result = http.infer("segment", [tensor], model_version=version, headers=server.headers())
            served = version or "1"
            assert result.get_response()["model_version"] == served
            assert np.array_equal(result.as_numpy("MASK"), expected[int(served)]), version
    finally:
        http.close()

    # gRPC ModelInfer.model_version
    grpc = grpcclient.InferenceServerClient(server.grpc_address)
    try:
        tensor = grpcclient.InferInput("IMAGE", list(u8.shape), "UINT8")
        tensor.set_data_from_numpy(u8)
        result = grpc.infer("segment", [tensor], model_version="2", headers=_grpc_headers(server))
        assert result.get_response().model_version == "2"
        assert np.array_equal(result.as_numpy("MASK"), expected[2])
    finally:
        grpc.close()


def test_unknown_model_or_version_is_404_naming_it(setup):
    server, _, _, _ = setup
    png = encode_png(_phantom_u8())
    for model, status in (("tiny:9", 404), ("nosuch", 404), ("tiny@staging", 404), ("Bad Name!", 400)):
        response = _rest(server, png, model)
        assert response.status_code == status, (model, response.text)
        body = response.json()
        assert body["field"] == "model", body
    assert "9" in _rest(server, png, "tiny:9").json()["error"]
    assert "nosuch" in _rest(server, png, "nosuch").json()["error"]

    reply = httpx.post(server.url + "/v2/models/segment/versions/9/infer", headers=server.headers(), timeout=60,
                       json={"inputs": [{"name": "IMAGE", "datatype": "UINT8", "shape": [2, 2],
                                         "data": [0, 1, 2, 3]}]})
    assert reply.status_code == 404 and "9" in reply.json()["error"]
    grpc = grpcclient.InferenceServerClient(server.grpc_address)
    try:
        tensor = grpcclient.InferInput("IMAGE", [2, 2], "UINT8")
        tensor.set_data_from_numpy(np.zeros((2, 2), np.uint8))
        with pytest.raises(InferenceServerException) as caught:
            grpc.infer("segment", [tensor], model_version="9", headers=_grpc_headers(server))
        assert "NOT_FOUND" in str(caught.value.status())
    finally:
        grpc.close()


def test_at_most_k_versions_stay_loaded_production_pinned(setup):
    server, registry, pipelines, (run2, art2) = setup
    png = encode_png(_phantom_u8())
    v3 = registry.register(run2, art2, name=NAME)  # the same bytes as v2, a separate version
    try:
        assert _rest(server, png, "tiny:2").status_code == 200
        assert _rest(server, png, f"tiny:{v3.version}").status_code == 200
        loaded = _loaded(server)
        assert sorted(loaded) == sorted(["tiny:1", f"tiny:{v3.version}"]), loaded  # v2 evicted, v1 pinned
        assert _rest(server, png, "tiny:2").json()["model"]["version"] == "tiny:2"  # reloads on use
        assert sorted(_loaded(server)) == ["tiny:1", "tiny:2"]
    finally:
        registry.delete_version(NAME, v3.version)


def test_promotion_and_rollback_under_load_fail_nothing(setup):
    """Two clients keep sending for ~15 s while v2 (not loaded: it loads under load) is promoted and v1
    restored through the registry (the server notices within its 1 s alias TTL); every answer is 200 and the
    version switches 1 -> 2 -> 1."""
    server, registry, _, (run2, art2) = setup
    png = encode_png(_phantom_u8())
    extra = registry.register(run2, art2, name=NAME)  # using it pushes v2 out (K = 2, v1 pinned)
    assert _rest(server, png, f"tiny:{extra.version}").status_code == 200
    assert "tiny:2" not in _loaded(server)
    records: list[tuple[float, float, int, str | None]] = []  # (sent, answered, status, version)
    stop = threading.Event()
    lock = threading.Lock()

    def client_loop() -> None:
        with server.client(timeout=120) as client:
            while not stop.is_set():
                sent = time.monotonic()
                response = _rest(server, png, client=client)
                version = response.json().get("model", {}).get("version") if response.status_code == 200 else None
                with lock:
                    records.append((sent, time.monotonic(), response.status_code, version))

    def wait_for(version: str) -> float:
        """Send probes (counted too) until one is answered by ``version``; its send time."""
        deadline = time.monotonic() + 60
        with server.client(timeout=120) as client:
            while time.monotonic() < deadline:
                sent = time.monotonic()
                response = _rest(server, png, client=client)
                answer = response.json().get("model", {}).get("version") if response.status_code == 200 else None
                with lock:
                    records.append((sent, time.monotonic(), response.status_code, answer))
                if answer == version:
                    return time.monotonic()
        raise AssertionError(f"no answer from {version} within 60 s")

    threads = [threading.Thread(target=client_loop) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(3)
        promoted_at = time.monotonic()
        registry.set_alias(NAME, "production", 2)
        seen_2 = wait_for("tiny:2")
        time.sleep(4)
        rolled_back_at = time.monotonic()
        registry.set_alias(NAME, "production", 1)
        seen_1 = wait_for("tiny:1")
        time.sleep(4)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=180)
        registry.set_alias(NAME, "production", 1)
        registry.delete_version(NAME, extra.version)

    failed = [r for r in records if r[2] != 200]
    assert failed == [], f"{len(failed)} of {len(records)} requests failed: {failed[:5]}"
    before = [r[3] for r in records if r[1] < promoted_at]
    during = [r[3] for r in records if r[0] > seen_2 and r[1] < rolled_back_at]
    after = [r[3] for r in records if r[0] > seen_1]
    assert before and set(before) == {"tiny:1"}
    assert during and set(during) == {"tiny:2"}
    assert after and set(after) == {"tiny:1"}
    assert len(records) >= 20, len(records)
    print(f"promotion under load: {len(records)} requests, 0 failed, "
          f"{len(before)} before / {len(during)} on v2 / {len(after)} after the rollback")



def test_tampered_stored_version_is_refused_and_the_rest_keep_serving(setup):
    server, registry, _, (run2, art2) = setup
    png = encode_png(_phantom_u8())
    info = registry.register(run2, art2, name=NAME)
    stored = registry.bento.path(info.bento_tag)
    graph = sorted(stored.rglob("*.onnx"))[0]
    graph.chmod(0o644)
    graph.write_bytes(graph.read_bytes() + b"tampered")
    try:
        response = _rest(server, png, f"tiny:{info.version}")
        assert response.status_code == 500, response.text
        body = response.json()
        assert body["field"] == "model" and f"tiny:{info.version}" in body["error"] and "sha256" in body["error"]
        assert str(stored) not in response.text  # no server path in the answer
        assert f"tiny:{info.version}" not in _loaded(server)
        assert _rest(server, png).json()["model"]["version"] == "tiny:1"
    finally:
        registry.delete_version(NAME, info.version)
