"""The guard owns the request deadlines: an answer not begun ``request_timeout_s`` + 5 s after the request
arrived whole is a 504 in our ``{"error", "field"}`` shape, and BentoML's own timeout (which counts from the
first byte and answers in its own shape) is set past the slowest upload the rate rule allows (issue 15,
item 11). In-process ASGI: the app behind the guard never answers."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from service.middleware import ANSWER_GRACE_S, GuardMiddleware
from service.settings import ServiceSettings

BOUNDARY = b"deadline"
BODY = (b"--deadline\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n\r\nimg\r\n"
        b"--deadline--\r\n")


async def _call_guard(settings: ServiceSettings) -> tuple[list[dict], float]:
    async def never_answers(scope, receive, send):
        while (await receive()).get("more_body", False):
            pass
        await asyncio.sleep(3600)

    guard = GuardMiddleware(never_answers, runtime=lambda: None, settings=lambda: settings)
    scope = {"type": "http", "method": "POST", "path": "/segment",
             "headers": [(b"content-type", b"multipart/form-data; boundary=" + BOUNDARY),
                         (b"content-length", str(len(BODY)).encode())]}
    messages = [{"type": "http.request", "body": BODY, "more_body": False}]
    sent: list[dict] = []

    async def receive():
        if messages:
            return messages.pop(0)
        await asyncio.sleep(3600)  # the client stays connected

    async def send(message):
        sent.append(message)

    started = time.monotonic()
    await asyncio.wait_for(guard(scope, receive, send), timeout=60)
    return sent, time.monotonic() - started


def test_an_answer_not_begun_in_time_is_our_504():
    settings = ServiceSettings(request_timeout_s=0.5)
    sent, took = asyncio.run(_call_guard(settings))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))
    assert start["status"] == 504
    assert set(body) == {"error", "field"} and "request_timeout_s" in body["error"]
    assert 0.5 + ANSWER_GRACE_S - 0.1 <= took < 0.5 + ANSWER_GRACE_S + 20


def test_bentoml_timeout_lies_past_the_slowest_allowed_upload():
    settings = ServiceSettings()
    slowest_upload_s = settings.upload_grace_s + settings.max_upload_bytes / settings.min_upload_bytes_per_s
    assert settings.longest_request_s >= slowest_upload_s + settings.request_timeout_s + ANSWER_GRACE_S
    assert ServiceSettings(min_upload_bytes_per_s=0).longest_request_s >= 86_400


@pytest.mark.parametrize("variable", ["MEDREFINE_MAX_RECEIVING", "MEDREFINE_KEEPALIVE_TIMEOUT_S"])
def test_new_limits_refuse_nonsense_naming_the_variable(variable):
    from service.settings import SettingsError

    with pytest.raises(SettingsError, match=variable):
        ServiceSettings.from_env({variable: "0"})


def test_the_service_hands_bentoml_that_timeout():
    from service.app import SETTINGS, MedRefine

    assert MedRefine.config["traffic"]["timeout"] == SETTINGS.longest_request_s
