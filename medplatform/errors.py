"""Typed platform errors: each names the field and the value at fault, so a caller maps the type, not the text.

``PlatformError`` is a ``ValueError``; the HTTP layer maps ``NotFound`` to 404, ``Conflict`` to 409, the rest to 400.
"""

from __future__ import annotations

from typing import Any


class PlatformError(ValueError):
    """A request the platform refuses; ``field`` names what is at fault and ``value`` what it was."""

    def __init__(self, field: str, value: Any, message: str) -> None:
        super().__init__(f"{field}: {message} (got {value!r})")
        self.field = field
        self.value = value


class InvalidValue(PlatformError):
    """A field's value is malformed or out of range (e.g. a model name BentoML cannot tag)."""


class NotFound(PlatformError):
    """The named model, version, alias or blob does not exist."""


class Conflict(PlatformError):
    """The request contradicts the stored state (e.g. a BentoML tag that holds other artifacts)."""


class AliasInUse(Conflict):
    """A version cannot be deleted while an alias points at it; ``aliases`` lists them."""

    def __init__(self, field: str, value: Any, aliases: list[str]) -> None:
        super().__init__(field, value, f"version is aliased as {', '.join(sorted(aliases))}; move the aliases first")
        self.aliases = sorted(aliases)


class IntegrityFailure(PlatformError):
    """Stored bytes no longer match their recorded sha256 (``field`` names the file)."""
