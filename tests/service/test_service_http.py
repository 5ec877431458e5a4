"""The BentoML service over real HTTP on loopback: results, batching, caching, errors, metrics, drain.

One server (``live_server``, session scope, API key on) serves these tests, on the tiny exported
artifacts of ``tests/support/artifact_factory.py``. SIGTERM under load is tests/service/test_shutdown.py, broken
artifacts at start-up tests/service/test_startup_checks.py, overload tests/service/test_overload.py.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from core.imageio import decode_image, encode_png
from core.metrics import dice
from core.phantoms import breast_ultrasound
from service.settings import ServiceSettings, SettingsError

_LEAKS = re.compile(r"Traceback|File \"|/work/|/tmp/|\.py\b")


def phantom_png(seed: int, size: int = 128) -> tuple[bytes, np.ndarray]:
    image, mask = breast_ultrasound(seed, size=size)
    return encode_png(image), mask


def png_array(b64: str) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(base64.b64decode(b64))))


def metric_value(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total, found = 0.0, False
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        match = re.match(r"^([a-zA-Z_:][\w:]*)(\{(.*)\})?\s+(\S+)$", line)
        if not match or match.group(1) != name:
            continue
        sample_labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(3) or ""))
        if all(sample_labels.get(k) == v for k, v in (labels or {}).items()):
            total += float(match.group(4))
            found = True
    if not found:
        raise AssertionError(f"metric {name}{labels or ''} not on /metrics")
    return total


def assert_client_error(response: httpx.Response, status: int, field: str | None = "unchecked") -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert isinstance(body.get("error"), str) and body["error"]
    assert "field" in body
    if field != "unchecked":
        assert body["field"] == field, body
    assert not _LEAKS.search(response.text), f"error leaks internals: {response.text}"
    return body


# ---------------------------------------------------------------------------------------------------
# Settings (no server)
# ---------------------------------------------------------------------------------------------------


def test_settings_from_env_cli_and_round_trip():
    env = {"MEDREFINE_PORT": "3100", "MEDREFINE_MAX_BATCH_SIZE": "4", "MEDREFINE_MAX_LATENCY_MS": "2.5",
           "MEDREFINE_BACKEND": "torch", "MY_KEY": "secret-key-123", "MEDREFINE_API_KEY_ENV": "MY_KEY"}
    settings = ServiceSettings.from_env(env)
    parsed = (settings.port, settings.max_batch_size, settings.max_latency_ms, settings.backend)
    assert parsed == (3100, 4, 2.5, "torch")
    assert settings.api_key == "secret-key-123" and settings.max_upload_bytes == 20 * 1024 * 1024
    assert ServiceSettings.from_env(settings.to_env()) == settings
    assert settings.public_dict()["api_key"] == "set" and "secret-key-123" not in json.dumps(settings.public_dict())
    with pytest.raises(SettingsError, match="MEDREFINE_MAX_QUEUE"):
        ServiceSettings.from_env({"MEDREFINE_MAX_QUEUE": "lots"})
    with pytest.raises(SettingsError, match="MEDREFINE_BACKEND"):
        ServiceSettings.from_env({"MEDREFINE_BACKEND": "tflite"})
    with pytest.raises(SettingsError, match="MEDREFINE_REQUIRE_API_KEY"):
        ServiceSettings.from_env({"MEDREFINE_REQUIRE_API_KEY": "1"})
    with pytest.raises(SettingsError, match="MEDREFINE_DEVICE"):
        ServiceSettings.from_env({"MEDREFINE_DEVICE": "gpu"})


def test_engine_options_follow_backend_and_device():
    import onnxruntime

    from service.runtime import engine_options

    auto = engine_options(ServiceSettings(intra_op_threads=2))
    has_cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    assert auto == {"device": "cuda" if has_cuda else "cpu", "intra_op_threads": 2}
    assert engine_options(ServiceSettings(device="tensorrt")) == {"device": "tensorrt"}
    assert engine_options(ServiceSettings(backend="torch", device="cpu")) == {"device": "cpu"}
    assert engine_options(ServiceSettings(backend="torch")) == {}
    assert engine_options(ServiceSettings(backend="tensorrt", device="cuda:1")) == {"device": 1}


def test_metrics_facade_counts_and_exposes_our_series():
    from service.metrics import ServiceMetrics, exposition_if_separate, multiprocess_mode

    metrics = ServiceMetrics()
    metrics.sync_cache(hits=3, misses=2, nbytes=4096)
    metrics.sync_cache(hits=5, misses=2, nbytes=1024)  # cumulative counters -> deltas
    metrics.observe_batch(3, [0.001, 0.002, 0.003])
    metrics.observe_request("segment", "rest", 200, 0.05)
    assert multiprocess_mode() is False  # this test process has no PROMETHEUS_MULTIPROC_DIR
    text = exposition_if_separate().decode()
    assert metric_value(text, "medrefine_embedding_cache_hits_total") == 5
    assert metric_value(text, "medrefine_embedding_cache_misses_total") == 2
    assert metric_value(text, "medrefine_embedding_cache_bytes") == 1024
    assert metric_value(text, "medrefine_batch_size_bucket", {"le": "3.0"}) >= 1
    assert metric_value(text, "medrefine_queue_wait_seconds_count") >= 3


def test_error_responses_map_codes_headers_and_hide_internals():
    from inference.pipeline import PromptError
    from service.errors import QueueFullError, RequestTimeoutError
    from service.rest import error_response

    full = error_response(QueueFullError(retry_after=2.4))
    assert full.status_code == 503 and full.headers["retry-after"] == "2"
    assert json.loads(full.body) == {"error": "server busy: the inference queue is full", "field": None}
    assert error_response(RequestTimeoutError()).status_code == 504
    prompt = error_response(PromptError("box lies outside the image", "box"))
    assert prompt.status_code == 400 and json.loads(prompt.body)["field"] == "box"
    internal = error_response(RuntimeError("boom in /work/main/service/secret.py"))
    assert internal.status_code == 500 and b"secret" not in internal.body and b"/work" not in internal.body


class _Recorder:
    def __init__(self) -> None:
        self.requests: list[tuple[str, str, str]] = []

    def observe_request(self, endpoint, protocol, status, seconds):
        self.requests.append((endpoint, protocol, str(status)))


def _guard_scenario(app, hang_up_after_s: float):
    """Run GuardMiddleware over ``app`` for one /segment request whose client hangs up after a delay."""
    from types import SimpleNamespace

    from service.middleware import GuardMiddleware

    body = (b"--B\r\nContent-Disposition: form-data; name=\"file\"; filename=\"p.png\"\r\n\r\n" + _PNG
            + b"\r\n--B--\r\n")
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        if pending:
            return pending.pop(0)
        await asyncio.sleep(hang_up_after_s)
        return {"type": "http.disconnect"}

    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    recorder = _Recorder()
    runtime = SimpleNamespace(metrics=recorder, check_api_key=lambda key: True)
    guard = GuardMiddleware(app, runtime=lambda: runtime, settings=lambda: ServiceSettings())
    scope = {"type": "http", "path": "/segment", "method": "POST",
             "headers": [(b"content-type", b"multipart/form-data; boundary=B")]}
    asyncio.run(asyncio.wait_for(guard(scope, receive, send), 10))
    return sent, recorder.requests


def test_client_disconnect_cancels_the_queued_handler():
    cancelled = []

    async def slow_app(scope, receive, send):
        while (await receive()).get("more_body"):
            pass
        try:
            await asyncio.sleep(30)  # waiting in the batching queue
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    sent, requests = _guard_scenario(slow_app, hang_up_after_s=0.05)
    assert cancelled == [True]
    # The app sent nothing; the guard closes the request with a 499 that the server drops (the client is
    # gone) so that the middleware outside it (BentoML's timeout) sees the request end.
    assert [(m["type"], m.get("status")) for m in sent] == [("http.response.start", 499), ("http.response.body", None)]
    assert requests == [("segment", "rest", "499")]


def test_answered_request_is_not_cancelled_by_the_disconnect_watch():
    async def quick_app(scope, receive, send):
        while (await receive()).get("more_body"):
            pass
        await asyncio.sleep(0.05)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    sent, requests = _guard_scenario(quick_app, hang_up_after_s=0.2)
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert requests == [("segment", "rest", "200")]


# Broken artifacts at start-up (one stderr line, exit 2): tests/service/test_startup_checks.py.


# ---------------------------------------------------------------------------------------------------
# Probes, results, batching, caching
# ---------------------------------------------------------------------------------------------------


def test_probes_report_model_version_and_backend(live_server, service_artifacts):
    manifest = json.loads((service_artifacts.art_dir / "manifest.json").read_text())
    live = httpx.get(live_server.url + "/livez")
    assert live.status_code == 200 and live.json() == {"live": True}
    ready = httpx.get(live_server.url + "/readyz")
    assert ready.status_code == 200
    body = ready.json()
    assert body["ready"] is True and body["backend"] == "onnxruntime"
    assert body["model_version"] == manifest["version"]


def test_segment_equals_offline_pipeline(live_server, service_artifacts):
    from inference.pipeline import SegmentationPipeline

    png, truth = phantom_png(seed=11, size=128)
    with live_server.client() as client:
        response = client.post("/segment", files={"file": ("phantom.png", png, "image/png")},
                               data={"outputs": "mask,coarse_mask,gate,image"})
    assert response.status_code == 200, response.text
    body = response.json()
    served = (png_array(body["mask_png_base64"]) > 127).astype(np.uint8)

    pipeline = SegmentationPipeline.from_artifacts(service_artifacts.art_dir, "onnxruntime", intra_op_threads=1)
    pixels = decode_image(png).pixels
    (offline,) = pipeline.segment([pixels])
    assert np.array_equal(served, offline.mask)
    assert dice(served, truth) == dice(offline.mask, truth)
    assert np.array_equal(png_array(body["coarse_mask_png_base64"]) > 127, offline.coarse_mask.astype(bool))
    assert png_array(body["image_png_base64"]).shape == (128, 128)
    assert png_array(body["gate_png_base64"]).shape == (128, 128)
    assert body["area_px"] == int(offline.mask.sum()) and body["shape"] == [128, 128]
    assert body["box"] == pytest.approx(offline.box.tolist(), abs=1e-4)
    assert body["iou"] == pytest.approx(offline.iou, abs=1e-5)
    assert body["model"] == {
        "version": "default:1",
        "backend": "onnxruntime",  # registry name:version
        "precision": {"artifacts": "fp32", "graphs": {g: "fp32" for g in pipeline.engine.graph_names}},
    }
    assert {"decode", "transunet", "image_encoder", "mask_decoder", "total"} <= set(body["timings_ms"])
    assert body["area_mm2"] is None  # PNG has no pixel spacing


def test_dicom_upload_gives_mm2_area_and_dicom_seg(live_server):
    data = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    with live_server.client() as client:
        response = client.post("/segment", files={"file": ("ct.dcm", data, "application/dicom")},
                               data={"dicom_seg": "true", "anonymize": "true"})
    assert response.status_code == 200, response.text
    body = response.json()
    source = pydicom.dcmread(io.BytesIO(data))
    spacing = [float(v) for v in source.PixelSpacing]
    assert body["area_mm2"] == pytest.approx(body["area_px"] * spacing[0] * spacing[1], rel=1e-6)
    seg = pydicom.dcmread(io.BytesIO(base64.b64decode(body["dicom_seg_base64"])))
    assert seg.Modality == "SEG" and seg.StudyInstanceUID == source.StudyInstanceUID
    assert str(seg.PatientName) == "" and seg.PatientIdentityRemoved == "YES"


def test_concurrent_burst_is_batched(live_server):
    pngs = [phantom_png(seed=100 + i, size=96)[0] for i in range(4)]

    def scrape() -> str:
        return httpx.get(live_server.url + "/metrics").text

    before = scrape()
    batches_before = metric_value(before, "medrefine_batch_size_count")
    singles_before = metric_value(before, "medrefine_batch_size_bucket", {"le": "1.0"})

    async def burst(n: int) -> list[int]:
        async with httpx.AsyncClient(base_url=live_server.url, headers=live_server.headers(), timeout=60) as client:
            responses = await asyncio.gather(*(
                client.post("/segment", files={"file": ("p.png", pngs[i % 4], "image/png")}) for i in range(n)
            ))
        return [r.status_code for r in responses]

    statuses = asyncio.run(burst(24))
    assert statuses == [200] * 24
    after = scrape()
    batches = metric_value(after, "medrefine_batch_size_count") - batches_before
    singles = metric_value(after, "medrefine_batch_size_bucket", {"le": "1.0"}) - singles_before
    items = metric_value(after, "medrefine_batch_size_sum") - metric_value(before, "medrefine_batch_size_sum")
    assert items == 24
    assert batches < 24 and singles < batches, "no batch held more than one image"
    assert metric_value(after, "medrefine_requests_total",
                        {"endpoint": "segment", "protocol": "rest", "status": "200"}) >= 24
    assert metric_value(after, "medrefine_queue_wait_seconds_count") >= 24
    assert metric_value(after, "medrefine_stage_latency_seconds_count", {"stage": "image_encoder"}) > 0
    assert metric_value(after, "medrefine_inflight_requests") == 0
    assert metric_value(after, "medrefine_model_info", {"backend": "onnxruntime"}) == 1
    assert "bentoml_service_request_total" in after  # BentoML's own series are still there


def test_refine_twice_hits_the_embedding_cache(live_server):
    png, truth = phantom_png(seed=23, size=112)
    ys, xs = np.nonzero(truth)
    box = [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]
    before = httpx.get(live_server.url + "/metrics").text
    with live_server.client() as client:
        first = client.post("/refine", files={"file": ("p.png", png, "image/png")},
                            data={"box": json.dumps(box), "outputs": "mask,probability"})
        second = client.post("/refine", files={"file": ("p.png", png, "image/png")},
                             data={"box": json.dumps(box), "points": json.dumps([[float(xs.mean()), float(ys.mean())]]),
                                   "point_labels": "[1]"})
    assert first.status_code == 200, first.text
    assert second.status_code == 200, second.text
    one, two = first.json(), second.json()
    assert one["cache_hit"] is False and two["cache_hit"] is True
    assert "image_encoder" in one["timings_ms"] and "image_encoder" not in two["timings_ms"]
    assert one["box"] == box and two["points"] == [[float(xs.mean()), float(ys.mean())]]
    assert png_array(one["mask_png_base64"]).shape == truth.shape
    assert png_array(one["probability_png_base64"]).shape == truth.shape
    after = httpx.get(live_server.url + "/metrics").text
    assert metric_value(after, "medrefine_embedding_cache_hits_total") - metric_value(
        before, "medrefine_embedding_cache_hits_total") >= 1
    assert metric_value(after, "medrefine_embedding_cache_bytes") > 0


# ---------------------------------------------------------------------------------------------------
# Client errors: 4xx JSON {"error", "field"}, never a stack trace or a path
# ---------------------------------------------------------------------------------------------------

_PNG, _ = phantom_png(seed=5, size=64)


@pytest.mark.parametrize(
    ("route", "files", "data", "status", "field"),
    [
        ("/segment", {"file": ("p.png", _PNG)}, {"threshold": "1.5"}, 400, "threshold"),
        ("/segment", {"file": ("p.png", _PNG)}, {"gate": "bogus"}, 400, "gate"),
        ("/segment", {"file": ("p.png", _PNG)}, {"outputs": "mask,heatmap"}, 400, "outputs"),
        ("/segment", {"file": ("p.png", _PNG)}, {"threshold": "abc"}, 400, "threshold"),
        ("/segment", None, {"file": "http://169.254.169.254/latest"}, 400, "file"),
        ("/segment", None, {"threshold": "0.5"}, 400, "file"),
        ("/segment", {"file": ("notes.txt", b"just some text, not an image")}, {}, 415, "file"),
        ("/segment", {"file": ("x.webp", b"RIFF\x00\x00\x00\x00WEBPVP8 ")}, {}, 415, "file"),
        ("/segment", {"file": ("p.png", _PNG[:200])}, {}, 400, "file"),
        ("/segment", {"file": ("p.png", _PNG)}, {"dicom_seg": "true"}, 400, "dicom_seg"),
        ("/refine", {"file": ("p.png", _PNG)}, {}, 400, "box"),
        ("/refine", {"file": ("p.png", _PNG)}, {"box": "[10, 10, 500, 20]"}, 400, "box"),
        ("/refine", {"file": ("p.png", _PNG)}, {"box": "[30, 10, 20, 20]"}, 400, "box"),
        (
            "/refine",
            {"file": ("p.png", _PNG)},
            {"points": json.dumps([[5, 5]] * 17), "point_labels": json.dumps([1] * 17)},
            400,
            "points",
        ),
        ("/refine", {"file": ("p.png", _PNG)}, {"points": "[[5, 5]]", "point_labels": "[7]"}, 400, "point_labels"),
    ],
)
def test_bad_requests_answer_json_4xx(live_server, route, files, data, status, field):
    files = files or {"note": ("note.txt", b"not the image field")}  # keeps the request multipart
    with live_server.client() as client:
        response = client.post(route, files=files, data=data)
    assert_client_error(response, status, field)


def test_wrong_content_type_is_415(live_server):
    with live_server.client() as client:
        response = client.post("/segment", json={"file": "aGVsbG8="})
    assert_client_error(response, 415, "file")


def test_missing_or_wrong_api_key_is_401(live_server):
    for headers in ({}, {"Authorization": "Bearer wrong-key-0000"}, {"X-API-Key": "nope"}):
        response = httpx.post(live_server.url + "/segment", files={"file": ("p.png", _PNG)}, headers=headers)
        assert_client_error(response, 401)
    ok = httpx.post(live_server.url + "/segment", files={"file": ("p.png", _PNG)},
                    headers={"X-API-Key": live_server.api_key}, timeout=60)
    assert ok.status_code == 200, ok.text


def test_oversized_uploads_are_413_before_reading(live_server):
    limit = 20 * 1024 * 1024
    big = b"\x89PNG\r\n\x1a\n" + bytes(limit + 10)
    with live_server.client() as client:
        declared = client.post("/segment", files={"file": ("big.png", big)})
    assert_client_error(declared, 413, "file")

    boundary = "medrefine-test-boundary"

    def streamed():  # chunked: no Content-Length, counted as it arrives
        yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"s.png\"\r\n"
               "Content-Type: image/png\r\n\r\n").encode()
        for _ in range(22):
            yield bytes(1024 * 1024)
        yield f"\r\n--{boundary}--\r\n".encode()

    chunked = httpx.post(live_server.url + "/segment", content=streamed(), timeout=60,
                         headers={**live_server.headers(), "Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert_client_error(chunked, 413, "file")

    huge = io.BytesIO()
    Image.new("L", (8000, 6000)).save(huge, format="PNG")  # 48 MP, a few kB of PNG
    with live_server.client() as client:
        pixels = client.post("/segment", files={"file": ("huge.png", huge.getvalue())})
    body = assert_client_error(pixels, 413, "file")
    assert "40000000" in body["error"]


def test_truncated_multipart_is_400(live_server):
    boundary = "cut-here"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"p.png\"\r\n\r\n").encode()
    response = httpx.post(
        live_server.url + "/segment",
        content=body + _PNG[:100],
        timeout=30,
        headers={**live_server.headers(), "Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert_client_error(response, 400)


def test_client_errors_are_counted(live_server):
    labels = {"endpoint": "segment", "status": "400"}
    before = httpx.get(live_server.url + "/metrics").text
    with live_server.client() as client:
        bad = client.post("/segment", files={"file": ("p.png", _PNG)}, data={"threshold": "1.5"})
        refused = client.post("/refine", files={"file": ("p.png", _PNG)}, data={})
    assert bad.status_code == 400 and refused.status_code == 400
    after = httpx.get(live_server.url + "/metrics").text
    def grew(name: str, labels: dict[str, str]) -> float:  # a series is on /metrics from its first sample on
        first = metric_value(before, name, labels) if f"{name}{{" in before else 0.0
        return metric_value(after, name, labels) - first

    assert grew("medrefine_requests_total", labels) == 1
    assert grew("medrefine_request_latency_seconds_count", {"endpoint": "refine"}) == 1


# ---------------------------------------------------------------------------------------------------
# Runtime state and SIGTERM drain
# ---------------------------------------------------------------------------------------------------


def test_runtime_readiness_turns_false_when_draining(service_artifacts):
    from service.runtime import ServiceRuntime

    settings = ServiceSettings(artifacts=service_artifacts.art_dir, intra_op_threads=1, grpc_port=0)
    runtime = ServiceRuntime.load(settings)

    async def scenario():
        assert runtime.readiness()["ready"] is False  # loaded, not started
        await runtime.start()
        assert runtime.readiness()["ready"] is True
        pixels = decode_image(_PNG).pixels
        result = await runtime.segment(pixels, None, protocol="test")
        runtime.begin_drain()
        report = runtime.readiness()
        drained = await runtime.stop()
        return result, report, drained

    result, report, drained = asyncio.run(scenario())
    assert result.mask.shape == (64, 64)
    assert report["ready"] is False and report["draining"] is True and "draining" in report["reason"]
    assert drained is True
    assert runtime.check_api_key(None) is True  # auth off without a key


# SIGTERM under load over all three protocols: tests/service/test_shutdown.py.
