"""Multipart structure checked as the body streams past, with the parser Starlette (and so BentoML) uses."""

from __future__ import annotations

import logging

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from service.errors import BadRequest, ServiceError

__all__ = ["UPLOAD_FIELDS", "MultipartGuard"]

UPLOAD_FIELDS = (b"file", b"prior_mask")
# python-multipart logs a warning before raising on a malformed body; the guard answers 400 for it instead.
logging.getLogger("python_multipart.multipart").setLevel(logging.ERROR)


class MultipartGuard:
    """Structural checks of a multipart body as it streams past, with the parser Starlette (and so BentoML)
    will use on it, python-multipart, so the guard sees the parts and names the app will see:

    * the body is well-formed multipart and ends with its closing boundary (BentoML would answer 500);
    * every part has a field name;
    * a part named like an upload field (``file``, ``prior_mask``) is a file part (has a ``filename``),
      and comes once: BentoML would fetch a text value as a URL, and silently keep one of two files;
    * with ``fields`` and ``uploads`` (a BentoML API route's form fields and which of them are files): every
      part is one of its fields, and file parts only its upload fields. BentoML would ignore a misspelt option
      (``treshold``) and answer an image sent as ``image`` with an unnamed "could not be parsed".
    """

    def __init__(self, boundary: bytes, fields: frozenset[str] = frozenset(),
                 uploads: frozenset[str] = frozenset()) -> None:
        self._problem: ServiceError | None = None
        self._fields = fields
        self._uploads = uploads
        self._foreign: list[tuple[str, bool]] = []  # (name, is a file part) of parts that are not the route's
        self._seen: set[bytes] = set()
        self._header_field = b""
        self._header_value = b""
        self._disposition: bytes | None = None
        self._ended = False

        def on_header_field(data: bytes, start: int, end: int) -> None:
            self._header_field += data[start:end]

        def on_header_value(data: bytes, start: int, end: int) -> None:
            self._header_value += data[start:end]

        def on_header_end() -> None:
            if self._header_field.strip().lower() == b"content-disposition":
                self._disposition = self._header_value
            self._header_field = self._header_value = b""

        def on_headers_finished() -> None:
            self._check_part()
            self._disposition = None

        def on_end() -> None:
            self._ended = True

        self._parser = MultipartParser(boundary, {
            "on_header_field": on_header_field, "on_header_value": on_header_value,
            "on_header_end": on_header_end, "on_headers_finished": on_headers_finished, "on_end": on_end,
        })

    def _check_part(self) -> None:
        if self._problem is not None:
            return
        _, options = parse_options_header(self._disposition or b"")
        name = options.get(b"name")
        if not name:
            self._problem = BadRequest("malformed multipart/form-data body: a part has no field name "
                                       "(Content-Disposition: form-data; name=\"...\")")
            return
        field = name.decode("latin-1")
        is_file = b"filename" in options
        if self._fields and (field not in self._fields or (is_file and field not in self._uploads)):
            self._foreign.append((field, is_file))
        if name not in UPLOAD_FIELDS:
            return
        if b"filename" not in options:
            self._problem = BadRequest(f"field {field!r} must be a file upload (a multipart part with a filename); "
                                       "text values and URLs are not accepted", field)
        elif name in self._seen:
            self._problem = BadRequest(f"field {field!r} was sent more than once; send one file", field)
        self._seen.add(name)

    def feed(self, chunk: bytes, more_body: bool) -> ServiceError | None:
        if self._problem is None:
            try:
                self._parser.write(chunk)
            except MultipartParseError as exc:
                self._problem = BadRequest(f"malformed multipart/form-data body: {_printable(str(exc))}")
        if self._problem is None and not more_body and not self._ended:
            self._problem = BadRequest("malformed multipart/form-data body: truncated (no closing boundary)")
        if self._problem is None and not more_body and self._foreign:
            self._problem = self._foreign_part()
        return self._problem

    def _foreign_part(self) -> ServiceError:
        files = [name for name, is_file in self._foreign if is_file]
        if files and b"file" not in self._seen and "file" in self._uploads:
            return BadRequest(f"no file part named 'file' (got a file part named {_names(files)}): send the "
                              "image as -F file=@image.png", "file")
        name, is_file = self._foreign[0]
        if is_file:
            return BadRequest(f"unexpected file part {_names([name])}: this endpoint takes files only as "
                              f"{_names(sorted(self._uploads))}", name)
        return BadRequest(f"unknown field {_names([name])}: this endpoint takes {_names(sorted(self._fields))}", name)


def _names(names: list[str]) -> str:
    return ", ".join(repr(_printable(n, 40)) for n in names)


def _printable(text: str, limit: int = 120) -> str:
    return "".join(c if c.isprintable() else "?" for c in text)[:limit]
