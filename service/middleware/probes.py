"""``/livez`` and ``/readyz`` in JSON from the runtime (BentoML's own answer in plain text), and ``/ui`` -> ``/ui/``."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from service.middleware.exchange import Send, send_json

if TYPE_CHECKING:
    from service.protocols import FrontEndRuntime

__all__ = ["answer_probe"]


async def answer_probe(method: str, path: str, send: Send, runtime: FrontEndRuntime | None,
                       not_ready_reason: Callable[[], str]) -> bool:
    """Answer ``method path`` if it is one of ours; False when it is not (the guard goes on)."""
    if method in ("GET", "HEAD") and path in ("/livez", "/healthz"):
        live = True if runtime is None else bool(runtime.live)
        await send_json(send, 200 if live else 503, {"live": live})
    elif method in ("GET", "HEAD") and path == "/readyz":
        if runtime is None:
            await send_json(send, 503, {"ready": False, "reason": not_ready_reason()}, [(b"retry-after", b"1")])
            return True
        report = runtime.readiness()
        ready = bool(report.get("ready"))
        await send_json(send, 200 if ready else 503, report, [] if ready else [(b"retry-after", b"1")])
    elif path == "/ui":
        await send({"type": "http.response.start", "status": 307, "headers": [(b"location", b"/ui/")]})
        await send({"type": "http.response.body", "body": b""})
    else:
        return False
    return True
