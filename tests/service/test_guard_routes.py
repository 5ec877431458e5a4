"""Per-route body limits in the guard: ``POST /datasets`` takes a dataset archive up to its own limit
(the platform layer enforces it again while streaming), every other route keeps ``max_upload_bytes``.
In-process ASGI: the app behind the guard records what reached it."""

from __future__ import annotations

import asyncio
import json

from service.middleware import GuardMiddleware
from service.settings import ServiceSettings

MIB = 1024 * 1024


async def _post(path: str, length: int, content_type: bytes) -> tuple[int, bool]:
    reached = {"app": False}

    async def app(scope, receive, send):
        reached["app"] = True
        while (await receive()).get("more_body", False):
            pass
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    settings = ServiceSettings()  # max_upload_bytes 20 MiB
    guard = GuardMiddleware(app, runtime=lambda: None, settings=lambda: settings,
                            upload_limits={"/datasets": lambda: 64 * MIB})
    chunk = b"\0" * MIB
    sent_chunks = length // MIB
    messages = [{"type": "http.request", "body": chunk, "more_body": i < sent_chunks - 1} for i in range(sent_chunks)]
    scope = {"type": "http", "method": "POST", "path": path,
             "headers": [(b"content-type", content_type), (b"content-length", str(length).encode())]}
    statuses: list[int] = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.start":
            statuses.append(message["status"])
        elif message["type"] == "http.response.body" and statuses[-1] >= 400:
            assert "error" in json.loads(message["body"])

    await asyncio.wait_for(guard(scope, receive, send), timeout=60)
    return statuses[0], reached["app"]


def test_a_dataset_archive_over_the_inference_limit_reaches_the_platform_route():
    status, reached = asyncio.run(_post("/datasets", 30 * MIB, b"application/zip"))
    assert (status, reached) == (201, True)


def test_the_dataset_route_keeps_a_limit_of_its_own():
    status, reached = asyncio.run(_post("/datasets", 65 * MIB, b"application/zip"))
    assert (status, reached) == (413, False)


def test_inference_routes_keep_max_upload_bytes():
    status, reached = asyncio.run(_post("/segment", 30 * MIB, b"multipart/form-data; boundary=x"))
    assert (status, reached) == (413, False)
