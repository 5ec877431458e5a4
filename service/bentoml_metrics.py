"""BentoML's request metrics with bounded labels: its traffic middleware labels ``bentoml_service_*`` with the
raw request path, so every made-up path a client sends would add series; here a path becomes its route's
template (``/v2/models/{model}/infer``) or ``other`` before that middleware reads it."""

from __future__ import annotations

import re
from collections.abc import Collection
from typing import Any

__all__ = ["OTHER", "bound_bentoml_metric_paths", "endpoint_label"]

OTHER = "other"
# BentoML's own routes, the /ui and /v2 roots and the OIP server-level routes (service/oip_http.py).
_FIXED = frozenset({"/", "/docs.json", "/schema.json", "/metrics", "/livez", "/readyz", "/healthz", "/ui", "/ui/",
                    "/v2", "/v2/", "/v2/health/live", "/v2/health/ready"})
_OIP_MODEL = re.compile(r"^/v2/models/[^/]+(?P<version>/versions/[^/]+)?(?P<tail>/ready|/infer)?$")
_REAL_PATH = "medrefine.real_path"  # the scope key carrying the request's path past BentoML's middleware


def endpoint_label(path: str, api_routes: Collection[str]) -> str:
    """The ``endpoint`` label for a request to ``path``: the path itself for a fixed route or one of
    ``api_routes`` (``/segment``...), the OIP route template for ``/v2/models/...``, ``/ui/`` for the
    UI's static files, :data:`OTHER` for everything else."""
    if path in _FIXED or path in api_routes:
        return path
    if path.startswith("/ui/"):
        return "/ui/"
    match = _OIP_MODEL.match(path)
    if match:
        return "/v2/models/{model}" + ("/versions/{version}" if match["version"] else "") + (match["tail"] or "")
    return OTHER


class _RestorePath:
    """Sits just inside BentoML's metrics middleware: the rest of the app sees the request's real path."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if _REAL_PATH in scope:
            real = scope[_REAL_PATH]
            scope = {key: value for key, value in scope.items() if key != _REAL_PATH}
            scope["path"] = real
        await self.app(scope, receive, send)


def bound_bentoml_metric_paths(api_routes: Collection[str]) -> None:
    """Make BentoML build its traffic metrics middleware with :func:`endpoint_label` labels.

    Call at import of the service module, before BentoML builds the ASGI app (it looks the middleware class
    up in ``bentoml._internal.server.http.instruments`` then). BentoML 1.4 has no setting for this; the
    subclass keeps its metrics, names and label names, only the ``endpoint`` values are bounded.
    """
    from bentoml._internal.server.http import instruments

    base = instruments.RunnerTrafficMetricsMiddleware
    if getattr(base, "medrefine_bounded", False):
        return
    routes = frozenset(api_routes)

    class BoundedTrafficMetricsMiddleware(base):  # type: ignore[misc, valid-type]
        medrefine_bounded = True

        def __init__(self, app: Any, **options: Any) -> None:
            super().__init__(_RestorePath(app), **options)

        async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] in ("http", "websocket"):
                scope = {**scope, _REAL_PATH: scope["path"], "path": endpoint_label(scope["path"], routes)}
            await super().__call__(scope, receive, send)

    instruments.RunnerTrafficMetricsMiddleware = BoundedTrafficMetricsMiddleware
