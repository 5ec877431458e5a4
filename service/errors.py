"""Errors every front end (REST, OIP-HTTP, gRPC) maps to a status code and a JSON body.

Each error carries an HTTP ``code``, a one-line ``message`` meant for the client (it names the field or
value at fault and what was expected, never a server path or a stack trace) and the offending ``field``
(None when no single field is at fault). ``to_dict()`` is the REST body: ``{"error": ..., "field": ...}``.
"""

from __future__ import annotations

__all__ = [
    "BadRequest",
    "NotFound",
    "NotReady",
    "PayloadTooLarge",
    "QueueFullError",
    "RequestTimeoutError",
    "ServiceError",
    "TooManyRequests",
    "Unauthorized",
    "UnsupportedMediaType",
    "UploadTooSlow",
    "as_service_error",
]


class ServiceError(Exception):
    """Base of all client-visible errors.

    Args:
        message: what is wrong and what was expected, e.g. ``"threshold must be in (0, 1), got 1.5"``.
        field: the request field at fault (``"file"``, ``"threshold"``, ...) or None.
        code: HTTP status; subclasses fix it.
    """

    code: int = 500

    def __init__(self, message: str, field: str | None = None, *, code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        if code is not None:
            self.code = int(code)

    def to_dict(self) -> dict[str, object]:
        return {"error": self.message, "field": self.field}

    def headers(self) -> dict[str, str]:
        """Extra HTTP headers that go with this error (``Retry-After`` for 503s)."""
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code}, message={self.message!r}, field={self.field!r})"


class BadRequest(ServiceError):
    code = 400


class Unauthorized(ServiceError):
    code = 401

    def __init__(self, message: str = "missing or invalid API key (send 'Authorization: Bearer <key>')",
                 field: str | None = None) -> None:
        super().__init__(message, field)

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class NotFound(ServiceError):
    """The route exists but what it serves is not enabled here (e.g. generation without generator artifacts)."""

    code = 404


class PayloadTooLarge(ServiceError):
    code = 413


class UnsupportedMediaType(ServiceError):
    code = 415


class UploadTooSlow(ServiceError):
    """The request body arrived below the minimum upload rate (a slow client holding the server)."""

    code = 408


class QueueFullError(ServiceError):
    """The shared batching queue is full; the client should retry after ``retry_after`` seconds."""

    code = 503

    def __init__(self, message: str = "server busy: the inference queue is full", field: str | None = None,
                 *, retry_after: float = 1.0) -> None:
        super().__init__(message, field)
        self.retry_after = float(retry_after)

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, round(self.retry_after)))}


class TooManyRequests(ServiceError):
    """More requests are open than ``max_concurrency`` allows; retry after ``retry_after`` seconds."""

    code = 429

    def __init__(self, message: str = "server busy: too many open requests", field: str | None = None, *,
                 retry_after: float = 1.0) -> None:
        super().__init__(message, field)
        self.retry_after = float(retry_after)

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, round(self.retry_after)))}


class NotReady(ServiceError):
    """The server is starting, draining for shutdown, or failed to load its artifacts."""

    code = 503

    def __init__(self, message: str = "server not ready", field: str | None = None, *,
                 retry_after: float = 1.0) -> None:
        super().__init__(message, field)
        self.retry_after = float(retry_after)

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, round(self.retry_after)))}


class RequestTimeoutError(ServiceError):
    code = 504

    def __init__(self, message: str = "the request did not finish in time", field: str | None = None) -> None:
        super().__init__(message, field)


def as_service_error(exc: BaseException) -> ServiceError | None:
    """The client-visible form of ``exc``, or None for an unexpected error (the caller answers a bare 500).

    ``ServiceError`` passes through; ``core.imageio.ImageDecodeError`` (its messages start with the input's
    name, ``"upload"`` here, never a server path) becomes 415 for an unsupported format, 413 for a size
    or decompression-bomb limit and 400 otherwise; any other ``ValueError`` (the pipeline's prompt and
    option checks) becomes 400 with its message.
    """
    if isinstance(exc, ServiceError):
        return exc
    name = type(exc).__name__
    message = str(exc) or name
    field = getattr(exc, "field", None)
    if name == "ImageDecodeError" or any(cls.__name__ == "ImageDecodeError" for cls in type(exc).__mro__):
        lowered = message.lower()
        field = field or "file"
        if "unsupported format" in lowered:
            return UnsupportedMediaType(message, field)
        if "over the limit" in lowered or "decompression bomb" in lowered:
            return PayloadTooLarge(message, field)
        return BadRequest(message, field)
    if isinstance(exc, ValueError):
        return BadRequest(message, field if isinstance(field, str) else None)
    return None
