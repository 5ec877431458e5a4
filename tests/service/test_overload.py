"""Overload on a live server with tight limits: refusals are prompt and clean, the server survives.

One server of its own (``python -m service`` in a subprocess) with a tiny batching queue
(``MEDREFINE_MAX_QUEUE=3``, one image per batch), ``MEDREFINE_MAX_CONCURRENCY=12`` and
``MEDREFINE_MAX_PIXELS=10000000``:

* a flood of 40 concurrent uploads: every answer is 200, 503 (queue full) or 429 (too many open
  requests); each refusal carries ``Retry-After`` and a JSON body, and comes back sooner than the
  slowest success; no 5xx; the server is ready afterwards and its memory does not grow flood after flood;
* clients that hang up while their requests wait in the queue (REST and KServe v2 over HTTP: raw sockets
  closed; gRPC: the call cancelled) cost nothing: their requests never reach the model (batch count) and
  are counted as 499;
* the pixel limit is the configured one.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from collections import Counter

import grpc
import httpx
import numpy as np
import psutil
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tests.support.bad_inputs import assert_no_leak, header_only_png, pil_bytes

pytestmark = pytest.mark.timeout(300)

FLOOD = 40
LIMITS = {
    "MEDREFINE_MAX_QUEUE": "3",
    "MEDREFINE_MAX_BATCH_SIZE": "1",
    "MEDREFINE_MAX_LATENCY_MS": "0",
    "MEDREFINE_MAX_CONCURRENCY": "12",
    "MEDREFINE_MAX_PIXELS": "10000000",
}


@pytest.fixture(scope="module")
def tight_server(service_artifacts, tmp_path_factory):
    from tests.support.service_fixtures import start_server

    server = start_server(service_artifacts.art_dir, tmp_path_factory.mktemp("tight_server"), env=LIMITS)
    yield server
    server.stop()


def _metric(server, name: str, labels: dict[str, str] | None = None) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        match = re.match(r"^([a-zA-Z_:][\w:]*)(\{(.*)\})?\s+(\S+)$", line)
        if not match or match.group(1) != name:
            continue
        sample = dict(re.findall(r'(\w+)="([^"]*)"', match.group(3) or ""))
        if all(sample.get(k) == v for k, v in (labels or {}).items()):
            total += float(match.group(4))
    return total


def _server_rss_mib(server) -> float:
    root = psutil.Process(server.process.pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]) / 2**20


def _noise_png(side: int, seed: int) -> bytes:
    return pil_bytes((np.random.default_rng(seed).random((side, side)) * 255).astype(np.uint8), "PNG")


async def _flood(server, png: bytes, n: int) -> list[tuple[int, float, httpx.Response]]:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=server.url, headers=server.headers(), timeout=60, limits=limits) as client:
        async def one() -> tuple[int, float, httpx.Response]:
            started = time.monotonic()
            response = await client.post("/segment", files={"file": ("f.png", png, "image/png")})
            return response.status_code, time.monotonic() - started, response

        return await asyncio.gather(*(one() for _ in range(n)))


def test_flood_gets_prompt_clean_refusals_and_the_server_survives(tight_server):
    png = _noise_png(512, seed=1)
    outcomes = asyncio.run(_flood(tight_server, png, FLOOD))
    after_first = _server_rss_mib(tight_server)
    statuses = Counter(status for status, _, _ in outcomes)
    assert set(statuses) <= {200, 429, 503}, statuses
    assert statuses[200] >= 1 and statuses[503] >= 1 and statuses[429] >= 1, statuses
    ok_latencies = [seconds for status, seconds, _ in outcomes if status == 200]
    for status, seconds, response in outcomes:
        if status == 200:
            continue
        assert int(response.headers["retry-after"]) >= 1, response.headers
        body = response.json()
        assert set(body) == {"error", "field"} and "server busy" in body["error"], body
        assert ("max_queue=3" if status == 503 else "max_concurrency=12") in body["error"], body
        assert_no_leak(response.text)
        assert seconds < max(ok_latencies), "a refusal waited as long as the slowest success"
        assert seconds < 10.0
    # Ready again at once, and it still serves.
    assert httpx.get(tight_server.url + "/readyz", timeout=10).status_code == 200
    again = httpx.post(tight_server.url + "/segment", files={"file": ("f.png", png, "image/png")},
                       headers=tight_server.headers(), timeout=60)
    assert again.status_code == 200, again.text
    # Memory is bounded: a second flood of the same size does not grow the server.
    second = Counter(status for status, _, _ in asyncio.run(_flood(tight_server, png, FLOOD)))
    assert set(second) <= {200, 429, 503}, second
    after_second = _server_rss_mib(tight_server)
    assert after_second < after_first + 100, (after_first, after_second)
    assert tight_server.process.poll() is None
    assert _metric(tight_server, "medrefine_requests_total", {"endpoint": "segment", "status": "503"}) >= 1
    assert _metric(tight_server, "medrefine_requests_total", {"endpoint": "segment", "status": "429"}) >= 1


def _raw_http(server, method: str, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{server.port}", f"Content-Length: {len(body)}",
             *(f"{k}: {v}" for k, v in {**server.headers(), **headers}.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _multipart(png: bytes) -> tuple[bytes, dict[str, str]]:
    request = httpx.Request("POST", "http://x/segment", files={"file": ("q.png", png, "image/png")})
    return request.read(), {"Content-Type": request.headers["content-type"]}


def test_disconnected_clients_queued_requests_never_run(tight_server):
    """A slow request holds the inference thread; three clients (REST, KServe v2 over HTTP, gRPC) queue
    behind it, then hang up. Only the slow request runs; the three are dropped and counted as 499."""
    y, x = np.mgrid[:3000, :3000]
    slow_png = pil_bytes(((x + y) % 256).astype(np.uint8), "PNG")  # 9 MP: seconds of glue on this CPU
    small = (np.random.default_rng(2).random((32, 32)) * 255).astype(np.uint8)
    oip_body = json.dumps({"inputs": [{"name": "IMAGE", "datatype": "UINT8", "shape": [32, 32],
                                       "data": small.ravel().tolist()}]}).encode()
    rest_body, rest_headers = _multipart(pil_bytes(small, "PNG"))
    batches_before = _metric(tight_server, "medrefine_batch_size_count")
    rest_gone_before = _metric(tight_server, "medrefine_requests_total", {"endpoint": "segment", "status": "499"})
    oip_gone_before = _metric(tight_server, "medrefine_requests_total", {"protocol": "oip-http", "status": "499"})
    grpc_gone_before = _metric(tight_server, "medrefine_requests_total", {"protocol": "grpc", "status": "499"})
    grpc_request = service_pb2.ModelInferRequest(model_name="segment")
    grpc_request.inputs.add(name="IMAGE", datatype="UINT8", shape=[32, 32])
    grpc_request.raw_input_contents.append(small.tobytes())
    channel = grpc.insecure_channel(tight_server.grpc_address)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    metadata = [(k.lower(), v) for k, v in tight_server.headers().items()]

    async def scenario() -> httpx.Response:
        async with httpx.AsyncClient(base_url=tight_server.url, headers=tight_server.headers(), timeout=120) as client:
            slow = asyncio.ensure_future(client.post("/segment", files={"file": ("slow.png", slow_png, "image/png")}))
            deadline = time.monotonic() + 60
            while _metric(tight_server, "medrefine_inflight_requests") < 1:  # the slow one is in the pipeline
                assert time.monotonic() < deadline and not slow.done(), "the slow request never started"
                await asyncio.sleep(0.02)
            sockets = []
            for path, body, headers in (("/segment", rest_body, rest_headers),
                                        ("/v2/models/segment/infer", oip_body, {"Content-Type": "application/json"})):
                sock = socket.create_connection(("127.0.0.1", tight_server.port), timeout=10)
                sock.sendall(_raw_http(tight_server, "POST", path, body, headers))
                sockets.append(sock)
            call = stub.ModelInfer.future(grpc_request, timeout=120, metadata=metadata)
            while _metric(tight_server, "medrefine_queue_depth") < 3:  # all wait behind the slow one
                assert time.monotonic() < deadline and not slow.done(), "the slow request ended too soon"
                await asyncio.sleep(0.02)
            for sock in sockets:
                sock.close()  # the clients hang up
            call.cancel()
            while _metric(tight_server, "medrefine_queue_depth") > 0:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            assert not slow.done(), "the queue emptied because the slow request finished, not the hang-ups"
            return await slow

    try:
        slow_response = asyncio.run(scenario())
    finally:
        channel.close()
    assert slow_response.status_code == 200, slow_response.text
    assert _metric(tight_server, "medrefine_batch_size_count") - batches_before == 1  # only the slow one ran
    assert _metric(tight_server, "medrefine_requests_total",
                   {"endpoint": "segment", "status": "499"}) - rest_gone_before == 1
    assert _metric(tight_server, "medrefine_requests_total",
                   {"protocol": "oip-http", "status": "499"}) - oip_gone_before == 1
    assert _metric(tight_server, "medrefine_requests_total",
                   {"protocol": "grpc", "status": "499"}) - grpc_gone_before == 1
    assert _metric(tight_server, "medrefine_inflight_requests") == 0


def test_pixel_limit_is_the_configured_one(tight_server):
    with tight_server.client(timeout=60) as client:
        refused = client.post("/segment", files={"file": ("big.png", header_only_png(3200, 3200), "image/png")})
        accepted = client.post("/segment", files={"file": ("ok.png", _noise_png(64, seed=3), "image/png")})
    assert refused.status_code == 413, refused.text
    assert "over the limit of 10000000 pixels" in refused.json()["error"]
    assert accepted.status_code == 200, accepted.text


def test_stops_cleanly_after_the_overload(tight_server):
    """Runs last: after floods and hang-ups nothing is left open, so SIGTERM ends the server at once, exit 0,
    with no request cancelled for running past the drain timeout (20 s here) and no traceback logged."""
    started = time.monotonic()
    code = tight_server.stop(timeout_s=60)
    took = time.monotonic() - started
    log = tight_server.log()
    assert code == 0, log[-3000:]
    assert took < 15, f"shutdown took {took:.1f} s: something held it open until the drain timeout"
    assert "graceful shutdown exceeded" not in log
    assert "Traceback" not in log, log[log.index("Traceback") - 200:][:3000]
