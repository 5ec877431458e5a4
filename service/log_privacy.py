"""Keep client data out of the server log, and keep every log line one line that the server wrote.
(Details: docs/architecture.md, "service".)
"""

from __future__ import annotations

import errno
import logging
import re
import sys
import threading
import traceback
import warnings
from collections.abc import Callable
from types import TracebackType
from typing import Any

__all__ = ["escape_controls", "install_log_redaction", "safe_traceback", "sanitise_record"]

# C0 controls (CR and LF among them), DEL, C1 controls (NEL among them) and the Unicode line/paragraph
# separators: anything a terminal or a log reader might take as the end of a line or a command.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_SANITISED = "_medrefine_sanitised"  # set on a record once it has been through sanitise_record

ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]


def escape_controls(text: str) -> str:
    """``text`` with every control character written as ``\\xNN`` (``\\uNNNN`` above U+00FF)."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100 else f"\\u{ord(m.group()):04x}",
                        text)


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
    if isinstance(exc, OSError) and exc.errno == errno.ENAMETOOLONG:  # BentoML saves uploads under their name
        return "upload file name too long"
    cause = exc.__cause__ or exc.__context__
    if type(cause).__name__ == "MultiPartException":
        return "unparsable multipart/form-data body"
    return None


def _withheld(exc: BaseException) -> str:
    """``module.Type: [message withheld ...]`` (the errno of an OSError kept: it is a code, not data)."""
    kind = type(exc).__qualname__
    module = type(exc).__module__
    if module not in ("builtins", "__main__"):
        kind = f"{module}.{kind}"
    size = len(str(exc)) if exc.args else 0
    number = exc.errno if isinstance(exc, OSError) else None
    code = f"errno {number}, " if isinstance(number, int) else ""
    return f"{kind}: [{code}message withheld, {size} characters]"


def safe_traceback(exc_info: ExcInfo) -> str:
    """The traceback of ``exc_info`` and its causes, frames only: every exception message is withheld.

    Frames name code (file, line, function, source line), never data; the exception messages are left
    out because any of them may quote a request's values. Control characters are escaped line by line.
    """
    # From the logged exception to its innermost cause; each entry's text says how it leads to the next
    # (outer) one, as Python's own traceback printout does.
    chain: list[tuple[BaseException, str]] = []
    seen: set[int] = set()
    exc: BaseException | None = exc_info[1]
    link = ""
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        chain.append((exc, link))
        if exc.__cause__ is not None:
            exc, link = exc.__cause__, "The above exception was the direct cause of the following exception:"
        elif exc.__context__ is not None and not exc.__suppress_context__:
            exc, link = exc.__context__, "During handling of the above exception, another exception occurred:"
        else:
            exc = None
    lines: list[str] = []
    for exc, link in reversed(chain):
        lines.append("Traceback (most recent call last):")
        for frame in traceback.format_tb(exc.__traceback__):
            lines += frame.rstrip("\n").split("\n")
        lines.append(_withheld(exc))
        if link:
            lines += ["", link, ""]
    return "\n".join(escape_controls(line) for line in lines)


def _escape_args(args: Any) -> Any:
    if isinstance(args, tuple):
        return tuple(escape_controls(a) if isinstance(a, str) else a for a in args)
    if isinstance(args, dict):
        return {k: escape_controls(v) if isinstance(v, str) else v for k, v in args.items()}
    return args


def sanitise_record(record: logging.LogRecord) -> logging.LogRecord:
    """Rewrite ``record`` in place as described in the module docstring (idempotent); returns it."""
    if getattr(record, _SANITISED, False):
        return record
    setattr(record, _SANITISED, True)
    exc = record.exc_info[1] if record.exc_info else None
    if exc is not None:
        summary = _client_input_summary(exc)
        if summary is not None:
            record.msg = record.getMessage().replace("%", "%%") + ": rejected client input: %s"
            record.args = (summary,)
            record.exc_info = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        else:
            record.exc_text = safe_traceback(record.exc_info)  # a Formatter uses exc_text when it is set
    if record.name == "py.warnings" and record.msg == "%s":  # logging.captureWarnings(True): the whole text
        record.msg, record.args = "a Python warning (text withheld: it may quote client data)", ()
    if isinstance(record.msg, str):
        record.msg = escape_controls(record.msg)
    record.args = _escape_args(record.args)
    try:
        message = record.getMessage()
    except Exception:  # a broken format string: the handler reports it as logging always does
        return record
    if _CONTROL.search(message):  # a non-string argument rendered a control character: flatten
        record.msg, record.args = escape_controls(message), ()
    return record


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    """``warnings.showwarning`` replacement: log the category and the code location, not the text."""
    logging.getLogger("py.warnings").warning(
        "%s at %s:%d (text withheld: a warning may quote client data)", category.__name__, filename, lineno
    )


def _log_thread_exception(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    logging.getLogger("service").error(
        "uncaught exception in thread %s", getattr(args.thread, "name", "?"),
        exc_info=(args.exc_type, args.exc_value or args.exc_type(), args.exc_traceback),
    )


def _log_uncaught(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    if issubclass(exc_type, KeyboardInterrupt):
        sys.__excepthook__(exc_type, exc, tb)
        return
    logging.getLogger("service").critical("uncaught exception", exc_info=(exc_type, exc, tb))


def install_log_redaction() -> None:
    """Sanitise every log record of this process and route warnings and uncaught exceptions through
    logging (idempotent)."""
    factory: Callable[..., logging.LogRecord] = logging.getLogRecordFactory()
    if not getattr(factory, _SANITISED, False):

        def sanitising_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            return sanitise_record(factory(*args, **kwargs))

        setattr(sanitising_factory, _SANITISED, True)
        logging.setLogRecordFactory(sanitising_factory)
    warnings.showwarning = _show_warning
    threading.excepthook = _log_thread_exception
    sys.excepthook = _log_uncaught
