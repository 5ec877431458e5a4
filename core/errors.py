"""Client-input errors, by type: every layer raises these for bad input and the service maps the type."""

from __future__ import annotations

__all__ = ["InputError", "InputTooLarge", "UnsupportedInput"]


class InputError(ValueError):
    """A client's value is invalid; the message names the value and what was expected.

    Args:
        message: e.g. ``"threshold must be in (0, 1), got 1.5"``.
        field: the request field at fault (``"file"``, ``"threshold"``, ...), or None when none is.
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class InputTooLarge(InputError):
    """Over a size limit: bytes, pixels, voxels, an inflate budget (HTTP 413)."""


class UnsupportedInput(InputError):
    """A format or content type this server does not read (HTTP 415)."""
