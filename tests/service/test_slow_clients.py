"""Slow clients cannot lock others out: a request holds a concurrency slot only once its body is whole.

One server of its own with ``MEDREFINE_MAX_CONCURRENCY=4``, ``MEDREFINE_MAX_RECEIVING=8``, a 2 s upload
grace and a 2000 bytes/s minimum upload rate. Raw sockets play the slow clients (issue 15, item 4, and
the soak stall of issue 13, where a load generator that sent its bodies late filled every slot):

* more slow uploads than ``max_concurrency`` in progress: a whole request from someone else still gets
  200, not 429;
* a body trickling below the minimum rate is cut off with 408 naming ``file`` and the connection closed;
* bodies still arriving beyond ``max_receiving`` are refused at once with 429 + ``Retry-After``;
* a client that leaves mid-upload is counted 499 (not a 400 of its own making), with no traceback logged.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.support.bad_inputs import pil_bytes

pytestmark = pytest.mark.timeout(300)

LIMITS = {
    "MEDREFINE_MAX_CONCURRENCY": "4",
    "MEDREFINE_MAX_RECEIVING": "8",
    "MEDREFINE_UPLOAD_GRACE_S": "2",
    "MEDREFINE_MIN_UPLOAD_BYTES_PER_S": "2000",
}
BOUNDARY = "slowclientboundary"


@pytest.fixture(scope="module")
def slow_server(service_artifacts, tmp_path_factory):
    from tests.support.service_fixtures import start_server

    server = start_server(service_artifacts.art_dir, tmp_path_factory.mktemp("slow_server"), env=LIMITS)
    yield server
    server.stop()


def _png() -> bytes:
    return pil_bytes((np.random.default_rng(7).random((64, 64)) * 255).astype(np.uint8), "PNG")


def _multipart(png: bytes) -> bytes:
    head = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode()
    return head + png + f"\r\n--{BOUNDARY}--\r\n".encode()


def _open_upload(server, body: bytes, sent: int) -> socket.socket:
    """A connection that has sent the headers of ``POST /segment`` and the first ``sent`` body bytes."""
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    auth = "".join(f"{k}: {v}\r\n" for k, v in server.headers().items())
    head = (f"POST /segment HTTP/1.1\r\nHost: {host}\r\n{auth}Content-Type: multipart/form-data; "
            f"boundary={BOUNDARY}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    sock.sendall(head + body[:sent])
    return sock


def _read_response(sock: socket.socket, timeout_s: float) -> tuple[int, dict[str, str], bytes]:
    sock.settimeout(timeout_s)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return status, headers, rest


def _metric(server, name: str, labels: dict[str, str]) -> float:
    from tests.service.test_overload import _metric as metric

    return metric(server, name, labels)


def test_slow_uploads_do_not_take_the_slots_of_whole_requests(slow_server):
    body = _multipart(_png())
    slow = [_open_upload(slow_server, body, sent=100) for _ in range(6)]  # 6 > max_concurrency=4
    try:
        time.sleep(0.5)  # the server has seen them all start
        with slow_server.client(timeout=60) as client:
            answers = [client.post("/segment", files={"file": ("b.png", _png(), "image/png")}) for _ in range(3)]
        assert [a.status_code for a in answers] == [200, 200, 200], [a.text for a in answers]
        mask = Image.open(io.BytesIO(base64.b64decode(answers[0].json()["mask_png_base64"])))
        assert mask.size == (64, 64)  # a real answer, not a refusal body
        for sock in slow:  # the slow uploads were still open all along: nothing answered them yet
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                sock.recv(1)
    finally:
        for sock in slow:
            sock.close()


def test_a_body_below_the_minimum_rate_gets_408_naming_file(slow_server):
    body = _multipart(_png())
    sock = _open_upload(slow_server, body, sent=10)
    try:
        started = time.monotonic()
        for i in range(10, 30):  # trickle: 1 byte every 0.3 s, far below 2000 bytes/s
            try:
                sock.sendall(body[i:i + 1])
            except OSError:
                break  # the server has already answered and closed
            time.sleep(0.3)
        status, headers, payload = _read_response(sock, timeout_s=30)
        took = time.monotonic() - started
    finally:
        sock.close()
    assert status == 408, payload
    assert json.loads(payload)["field"] == "file"
    assert "min_upload_bytes_per_s" in json.loads(payload)["error"]
    assert headers.get("connection") == "close"
    assert took < 20  # cut off after the 2 s grace, not held until some long timeout


def test_bodies_beyond_max_receiving_are_refused_at_once_with_retry_after(slow_server):
    body = _multipart(_png())
    held = [_open_upload(slow_server, body, sent=50) for _ in range(8)]  # max_receiving=8
    try:
        time.sleep(0.5)
        extra = _open_upload(slow_server, body, sent=50)
        try:
            status, headers, payload = _read_response(extra, timeout_s=10)
        finally:
            extra.close()
    finally:
        for sock in held:
            sock.close()
    assert status == 429, payload
    assert "retry-after" in headers
    assert "max_receiving=8" in json.loads(payload)["error"]


def test_a_client_leaving_mid_upload_counts_499_and_logs_no_traceback(slow_server):
    before = _metric(slow_server, "medrefine_requests_total", {"endpoint": "segment", "status": "499"})
    body = _multipart(_png())
    sock = _open_upload(slow_server, body, sent=len(body) // 2)
    time.sleep(0.3)
    sock.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        after = _metric(slow_server, "medrefine_requests_total", {"endpoint": "segment", "status": "499"})
        if after > before:
            break
        time.sleep(0.2)
    assert after - before == 1
    assert _metric(slow_server, "medrefine_requests_total", {"endpoint": "segment", "status": "400"}) == 0
    assert "Traceback" not in slow_server.log()
    assert httpx.get(slow_server.url + "/readyz", timeout=10).status_code == 200
