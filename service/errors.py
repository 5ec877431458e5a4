"""Errors every front end (REST, OIP-HTTP, gRPC) maps to a status code and a JSON body."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from core.errors import InputError, InputTooLarge, UnsupportedInput

__all__ = [
    "GENERIC_MESSAGE",
    "BadRequest",
    "Conflict",
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
    "client_error",
]

logger = logging.getLogger("service.errors")
GENERIC_MESSAGE = "internal error; see the server log"  # the REST body of every unexpected failure


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

    def rename_field(self, names: Mapping[str, str], *, drop: str = "") -> ServiceError:
        """Name the field as a protocol's request does (``names``: the runtime's argument -> the request's;
        other fields kept), the message's leading ``"<field>: "`` with it, and ``drop`` right after that
        prefix removed. Changes this error; returns it."""
        internal = self.field or ""
        name = names.get(internal)
        if name is None:
            return self
        message = self.message
        if message.startswith(f"{internal}: "):
            message = f"{name}: " + message[len(internal) + 2:].removeprefix(drop)
        self.message, self.field, self.args = message, name, (message,)
        return self

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


class Conflict(ServiceError):
    """The request contradicts stored state (a platform name or alias already in use)."""

    code = 409


# Input errors by type, most specific first: the first isinstance match answers.
_INPUT_ANSWERS: tuple[tuple[type[InputError], type[ServiceError]], ...] = (
    (InputTooLarge, PayloadTooLarge),
    (UnsupportedInput, UnsupportedMediaType),
    (InputError, BadRequest),
)


def as_service_error(exc: BaseException) -> ServiceError | None:
    """The client-visible form of ``exc`` by its type alone, or None for a server fault (answered 500).

    ``ServiceError`` passes through; ``core.errors.InputError`` becomes 413 (``InputTooLarge``), 415
    (``UnsupportedInput``) or 400, with its ``field``; an OIP request naming a model not served here is 404;
    medplatform's ``NotFound`` 404, ``Conflict`` 409 and other ``PlatformError`` 400. Anything else, a plain
    ``ValueError`` from a bug included, is None: its message is not for the client.
    """
    if isinstance(exc, ServiceError):
        return exc
    from service.oip import ModelNotFoundError

    if isinstance(exc, ModelNotFoundError):
        return NotFound(exc.message, exc.field)
    if isinstance(exc, InputError):
        answer = next(error for kind, error in _INPUT_ANSWERS if isinstance(exc, kind))
        return answer(str(exc), exc.field)
    platform = _platform_answer(exc)
    if platform is not None:
        return platform
    return None


def _platform_answer(exc: BaseException) -> ServiceError | None:
    try:
        from medplatform import errors as platform
    except ImportError:  # an install without the platform
        return None
    if not isinstance(exc, platform.PlatformError):
        return None
    answer = NotFound if isinstance(exc, platform.NotFound) else Conflict if isinstance(exc, platform.Conflict) \
        else BadRequest
    return answer(str(exc), exc.field)


def client_error(exc: BaseException, *, generic: str = GENERIC_MESSAGE) -> ServiceError:
    """What a transport answers for ``exc``: :func:`as_service_error`, or a 500 whose body is ``generic``
    (no internals) while the server log gets the traceback."""
    error = as_service_error(exc)
    if error is None:
        logger.error("unexpected %s answered 500", type(exc).__name__, exc_info=exc)
        error = ServiceError(generic, code=500)
    return error
