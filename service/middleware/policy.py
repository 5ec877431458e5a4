"""The per-route policy table: what the guard checks on each route (key, method, content type, body limit)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

__all__ = ["API_ROUTES", "BODY_METHODS", "UNGUARDED", "UNLIMITED_PATHS", "RoutePolicy", "policy_for"]

MULTIPART = "multipart/form-data"
JSON = "application/json"
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# Never refused for concurrency or while draining (probes and scrapes must answer); no API key either.
# The model-readiness probes /v2/models/{model}[/versions/{v}]/ready are matched by policy_for as well.
UNLIMITED_PATHS = frozenset({"/metrics", "/v2/health/live", "/v2/health/ready"})


@dataclass(frozen=True)
class RoutePolicy:
    """How the guard treats one route.

    Attributes:
        endpoint: the REST API's name (``"segment"``): counted in ``medrefine_requests_total`` and its
            BentoML errors (pydantic 400s, unparsable forms) answered in our ``{"error", "field"}`` shape.
        api_key: the guard checks the API key (``/v2`` checks it itself, in the OIP error shape).
        methods: the methods allowed (405 otherwise); empty: any (the app decides).
        content_type: the one media type accepted (415 otherwise); None: any.
        body_limit: the route's own body limit in bytes (``POST /datasets``); None: ``max_upload_bytes``.
        watch_handler: an inference route: a client that hangs up cancels its handler (dropping the queued
            request) and an answer not begun by the deadline is a 504.
        oip: errors in the Open Inference Protocol's ``{"error"}`` shape.
        guarded: False for probes and scrapes: passed through untouched (no key, no slot, no limits).
        fields: the form fields of a multipart API route (any other part is a 400 naming it); empty: not
            checked (the route reads its form itself).
        uploads: which of ``fields`` are files (a file part under any other name is a 400 naming it).
    """

    endpoint: str | None = None
    api_key: bool = False
    methods: frozenset[str] = frozenset()
    content_type: str | None = None
    body_limit: Callable[[], int] | None = None
    watch_handler: bool = False
    oip: bool = False
    guarded: bool = True
    fields: frozenset[str] = frozenset()
    uploads: frozenset[str] = frozenset()

    @property
    def multipart(self) -> bool:
        return self.content_type == MULTIPART


def _api(name: str, content_type: str, texts: tuple[str, ...] = (), uploads: tuple[str, ...] = ()) -> RoutePolicy:
    return RoutePolicy(endpoint=name, api_key=True, methods=frozenset({"POST"}), content_type=content_type,
                       watch_handler=True, fields=frozenset(texts + uploads), uploads=frozenset(uploads))


# The form fields of service.app's multipart APIs (tests/service/test_multipart_guard.py keeps them in step).
REST_POLICIES: Mapping[str, RoutePolicy] = {
    "/segment": _api("segment", MULTIPART, ("threshold", "gate", "gamma", "gate_min", "gate_max", "outputs",
                                            "dicom_seg", "anonymize", "model"), ("file",)),
    "/refine": _api("refine", MULTIPART, ("box", "points", "point_labels", "threshold", "outputs", "model"),
                    ("file", "prior_mask")),
    "/synthesize": _api("synthesize", MULTIPART, (), ("file",)),
    "/generate": _api("generate", JSON),
}
API_ROUTES = {path: policy.endpoint for path, policy in REST_POLICIES.items()}
UNGUARDED = RoutePolicy(guarded=False)
_OIP_INFER = RoutePolicy(watch_handler=True, oip=True)
_OIP = RoutePolicy(oip=True)
_DEFAULT = RoutePolicy()


def policy_for(method: str, path: str, upload_limits: Mapping[str, Callable[[], int]] = {}) -> RoutePolicy:  # noqa: B006
    """The policy of ``method path``; ``upload_limits``: routes taking bodies over ``max_upload_bytes``."""
    if path in UNLIMITED_PATHS:
        return UNGUARDED
    if path in REST_POLICIES:
        return REST_POLICIES[path]
    if path.startswith("/v2/models/"):
        if method in ("GET", "HEAD") and path.endswith("/ready"):
            return UNGUARDED
        if method == "POST" and path.endswith("/infer"):
            return _OIP_INFER
    if path.startswith("/v2/"):
        return _OIP
    if method == "POST" and path in upload_limits:
        return RoutePolicy(body_limit=upload_limits[path])
    return _DEFAULT
