"""Keep client data out of the server log.

Our own modules log shapes, sizes, codes and model versions, never pixel values, file names or DICOM
attributes. BentoML, however, logs every request it cannot turn into API arguments as an ERROR with the
exception's traceback, and a pydantic ``ValidationError`` quotes the submitted values (``input_value=...``):
a form field holding a patient's name would be written to the log verbatim. :class:`ClientInputRedactor`
rewrites those records: a client's bad input becomes one WARNING line with the field locations and error
types only, no values and no traceback. Server faults are left as they are.
"""

from __future__ import annotations

import logging

__all__ = ["BENTOML_REQUEST_LOGGER", "ClientInputRedactor", "install_log_redaction"]

# The logger of BentoML 1.4's ``log_exception`` (``bentoml._internal.server.http_app``).
BENTOML_REQUEST_LOGGER = "bentoml._internal.server.http_app"


def _client_input_summary(exc: BaseException) -> str | None:
    """A value-free description of ``exc`` if it is a client input problem, else None."""
    name = type(exc).__name__
    if name == "ValidationError" and hasattr(exc, "errors"):
        try:
            errors = exc.errors(include_input=False, include_context=False, include_url=False)
        except TypeError:  # an older pydantic without these switches
            errors = exc.errors()
        fields = ", ".join(
            f"{'.'.join(str(part) for part in error.get('loc', ())) or '<body>'} ({error.get('type', 'invalid')})"
            for error in errors[:8]
        )
        return f"{len(errors)} invalid field(s): {fields}"
    status = getattr(exc, "status_code", None)
    if name == "HTTPException" and isinstance(status, int) and status < 500:
        return f"HTTP {status}: {getattr(exc, 'detail', '')}"
    cause = exc.__cause__ or exc.__context__
    if type(cause).__name__ == "MultiPartException":
        return "unparsable multipart/form-data body"
    return None


class ClientInputRedactor(logging.Filter):
    """Turn "Exception on /segment [POST]" + traceback for a client's bad input into one value-free WARNING."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None:
            return True
        summary = _client_input_summary(exc)
        if summary is None:
            return True
        record.msg = record.getMessage().replace("%", "%%") + ": rejected client input: %s"
        record.args = (summary,)
        record.exc_info = None
        record.exc_text = None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def install_log_redaction() -> None:
    """Attach :class:`ClientInputRedactor` to BentoML's request-error logger (idempotent)."""
    logger = logging.getLogger(BENTOML_REQUEST_LOGGER)
    if not any(isinstance(f, ClientInputRedactor) for f in logger.filters):
        logger.addFilter(ClientInputRedactor())
