"""A ZIP reader for untrusted uploads: every entry is checked before anything is extracted, and sizes are
counted again while extracting; a hostile archive is an ``ArchiveRefused`` naming the entry."""

from __future__ import annotations

import io
import os
import re
import shutil
import stat
import tempfile
import zipfile
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import IO

from core.datasets import _is_litter  # the OS litter core.datasets ignores (__MACOSX/, .DS_Store)
from medplatform.dataset_limits import DatasetLimits
from medplatform.errors import InvalidValue

ARCHIVE = "<archive>"  # how a refusal names the archive itself rather than one entry
MAX_NAME_CHARS = 1024
MAX_SEGMENT_CHARS = 255
NESTED_SUFFIXES = (".zip", ".tar", ".tgz", ".gz", ".bz2", ".tbz2", ".xz", ".txz", ".7z", ".rar", ".jar",
                   ".zst", ".lz4", ".cab", ".iso")
ALLOWED_GZIP_SUFFIXES = (".nii.gz",)  # gzip-compressed NIfTI is an image format, not a nested archive
COMPRESSION_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
_ARCHIVE_MAGICS = (
    (b"PK\x03\x04", "ZIP"), (b"PK\x05\x06", "ZIP"), (b"PK\x07\x08", "ZIP"), (b"\x1f\x8b", "gzip"),
    (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"), (b"7z\xbc\xaf\x27\x1c", "7z"), (b"Rar!\x1a\x07", "RAR"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
)
_TAR_MAGIC_OFFSET = 257  # "ustar" in a tar header
_DRIVE = re.compile(r"^[A-Za-z]:")
_CHUNK = 1 << 16


class ArchiveRefused(InvalidValue):
    """A hostile or unreadable archive: ``entry`` is the member at fault (``<archive>`` for the whole file),
    ``reason`` what is wrong with it. ``field`` is the upload field (``file``)."""

    def __init__(self, entry: str, reason: str, *, field: str = "file") -> None:
        super().__init__(field, entry, f"archive refused at this entry: {reason}")
        self.entry = entry
        self.reason = reason


def entry_parts(name: str, *, field: str = "file") -> tuple[str, ...]:
    """The path segments of an archive entry or uploaded file name, after refusing every unsafe form.

    Refused (``ArchiveRefused`` naming ``name``): empty names, NUL or control characters, backslashes,
    absolute paths (``/x``, ``C:x``), ``..``/``.``/empty segments, names over 1024 characters or segments
    over 255. A trailing ``/`` (a directory entry) is dropped. ``field``: the upload field to blame.
    """
    if not name or not name.rstrip("/"):
        raise ArchiveRefused(name, "empty entry name", field=field)
    if any(ord(char) < 32 or ord(char) == 127 for char in name):
        raise ArchiveRefused(name, "control character in the entry name", field=field)
    if len(name) > MAX_NAME_CHARS:
        raise ArchiveRefused(name[:60] + "...", f"entry name over {MAX_NAME_CHARS} characters", field=field)
    if "\\" in name:
        raise ArchiveRefused(
            name, "backslash in the entry name (a Windows path separator that could escape)", field=field
        )
    if name.startswith("/") or _DRIVE.match(name):
        raise ArchiveRefused(name, "absolute path", field=field)
    parts = tuple(name.rstrip("/").split("/"))
    if ".." in parts:
        raise ArchiveRefused(name, "path traversal ('..' segment)", field=field)
    if any(part in ("", ".") for part in parts):
        raise ArchiveRefused(name, "empty or '.' path segment", field=field)
    if any(len(part) > MAX_SEGMENT_CHARS for part in parts):
        raise ArchiveRefused(name, f"path segment over {MAX_SEGMENT_CHARS} characters", field=field)
    return parts


def nested_archive_suffix(name: str) -> str | None:
    """The archive extension ``name`` ends with (``.zip``, ``.tar``, ``.gz`` but not ``.nii.gz``...), or None."""
    lower = name.lower()
    if lower.endswith(ALLOWED_GZIP_SUFFIXES):
        return None
    return next((suffix for suffix in NESTED_SUFFIXES if lower.endswith(suffix)), None)


def archive_magic(head: bytes, name: str) -> str | None:
    """The archive format ``head`` (a file's first bytes) starts with, or None; gzip is allowed for .nii.gz."""
    if len(head) >= _TAR_MAGIC_OFFSET + 5 and head[_TAR_MAGIC_OFFSET:_TAR_MAGIC_OFFSET + 5] == b"ustar":
        return "tar"
    for magic, label in _ARCHIVE_MAGICS:
        if head.startswith(magic):
            if label == "gzip" and name.lower().endswith(ALLOWED_GZIP_SUFFIXES):
                return None
            return label
    return None


def check_entries(infos: Iterable[zipfile.ZipInfo], limits: DatasetLimits) -> list[zipfile.ZipInfo]:
    """Check every entry of a ZIP's central directory; return the regular files (directories dropped).

    Refused, each naming the entry: unsafe names (:func:`entry_parts`), symlinks and other non-regular
    files (from the Unix mode in ``external_attr``), encrypted entries, unknown compression methods, two
    entries with one name, nested archives by extension, more than ``limits.max_files`` entries, an entry
    over ``max_file_bytes``, a declared total over ``max_bytes``, and an entry above ``ratio_min_bytes``
    whose uncompressed/compressed ratio is over ``max_ratio`` (a zip bomb). Declared sizes are only a
    first filter: :func:`safe_extract` counts the bytes it actually inflates.
    """
    infos = list(infos)
    if len(infos) > limits.max_files:
        raise ArchiveRefused(ARCHIVE, f"{len(infos)} entries, over the limit of {limits.max_files}")
    files, seen, total = [], set(), 0
    for info in infos:
        name = info.filename
        parts = entry_parts(name)
        mode = info.external_attr >> 16
        kind = stat.S_IFMT(mode)
        if kind == stat.S_IFLNK:
            raise ArchiveRefused(name, "symbolic link")
        if info.flag_bits & 0x1:
            raise ArchiveRefused(name, "encrypted entry")
        if info.is_dir():
            continue
        if kind not in (0, stat.S_IFREG):
            raise ArchiveRefused(name, f"not a regular file (mode {oct(mode)})")
        if info.compress_type not in COMPRESSION_METHODS:
            raise ArchiveRefused(name, f"unsupported compression method {info.compress_type}")
        key = "/".join(parts)
        if key in seen:
            raise ArchiveRefused(name, "two entries with this name")
        seen.add(key)
        suffix = nested_archive_suffix(name)
        if suffix is not None:
            raise ArchiveRefused(name, f"nested archive ({suffix}); upload one flat ZIP")
        if info.file_size > limits.max_file_bytes:
            raise ArchiveRefused(name, f"declares {info.file_size} bytes, over the per-file limit of "
                                       f"{limits.max_file_bytes}")
        if info.file_size >= limits.ratio_min_bytes and info.file_size > limits.max_ratio * max(info.compress_size, 1):
            ratio = info.file_size / max(info.compress_size, 1)
            raise ArchiveRefused(name, f"compression ratio {ratio:.0f}:1 over the limit of {limits.max_ratio}:1 "
                                       "(zip bomb)")
        total += info.file_size
        if total > limits.max_bytes:
            raise ArchiveRefused(name, f"entries up to this one declare {total} bytes uncompressed, over the "
                                       f"limit of {limits.max_bytes}")
        files.append(info)
    return files


def open_zip(source: str | os.PathLike[str] | bytes | IO[bytes], limits: DatasetLimits,
             spool_dir: str | os.PathLike[str] | None = None) -> zipfile.ZipFile:
    """Open a ZIP from a path, bytes or a binary stream (a non-seekable stream is spooled to a temporary
    file in ``spool_dir``, at most ``limits.max_bytes``). Not a ZIP, or too large: ``ArchiveRefused``."""
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            data = bytes(source)
            _check_archive_size(len(data), limits)
            return zipfile.ZipFile(io.BytesIO(data))
        if isinstance(source, (str, os.PathLike)):
            _check_archive_size(os.stat(source).st_size, limits)
            return zipfile.ZipFile(source)
        if not source.seekable():
            spooled = tempfile.TemporaryFile(dir=spool_dir)
            _copy_limited(source, spooled, limits.max_bytes + _ZIP_OVERHEAD, ARCHIVE)
            spooled.seek(0)
            source = spooled
        else:
            source.seek(0, os.SEEK_END)
            _check_archive_size(source.tell(), limits)
            source.seek(0)
        return zipfile.ZipFile(source)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, NotImplementedError) as exc:
        if isinstance(exc, ArchiveRefused):
            raise
        raise ArchiveRefused(ARCHIVE, f"not a readable ZIP archive ({exc})") from None


_ZIP_OVERHEAD = 64 * 2**20  # headers and directory a ZIP may add beyond its members' bytes


def _check_archive_size(size: int, limits: DatasetLimits) -> None:
    if size > limits.max_bytes + _ZIP_OVERHEAD:
        raise ArchiveRefused(ARCHIVE, f"archive of {size} bytes, over the limit of {limits.max_bytes} bytes")


def _copy_limited(source: IO[bytes], target: IO[bytes], limit: int, entry: str, head_check: str | None = None) -> int:
    """Copy in chunks, counting; more than ``limit`` bytes is refused mid-stream. With ``head_check`` (the
    entry's name) the first chunk is checked for a nested archive's magic bytes."""
    copied = 0
    while True:
        chunk = source.read(_CHUNK)
        if not chunk:
            return copied
        if head_check is not None and copied == 0:
            nested = archive_magic(chunk, head_check)
            if nested is not None:
                raise ArchiveRefused(entry, f"nested archive ({nested} content); upload one flat ZIP")
        copied += len(chunk)
        if copied > limit:
            raise ArchiveRefused(entry, f"inflates past {limit} bytes while extracting")
        target.write(chunk)


def safe_extract(source: str | os.PathLike[str] | bytes | IO[bytes], dest: str | os.PathLike[str],
                 limits: DatasetLimits | None = None) -> list[str]:
    """Extract a ZIP into ``dest`` (created; must not exist or be empty) after :func:`check_entries`.

    While extracting, each entry's inflated bytes are counted and refused past its declared size, and the
    total past ``limits.max_bytes``; a file is created only inside ``dest`` (resolved path checked, created
    exclusively, never through an existing link), and its first bytes must not be another archive.
    OS litter (``__MACOSX/``, dot files) is checked but not written. On any refusal ``dest`` is removed.

    Returns:
        the relative POSIX paths written, sorted.

    Raises:
        ArchiveRefused: naming the entry at fault (or ``<archive>``) and the reason.
    """
    limits = limits or DatasetLimits.from_env()
    root = Path(dest)
    root.mkdir(parents=True, exist_ok=True)
    if any(root.iterdir()):
        raise InvalidValue("dest", str(root), "extraction directory must be empty")
    base = root.resolve()
    try:
        with open_zip(source, limits, spool_dir=root.parent) as archive:
            files = check_entries(archive.infolist(), limits)
            written, total = [], 0
            for info in files:
                relative = "/".join(entry_parts(info.filename))
                if _is_litter(relative):
                    continue
                target = base.joinpath(*relative.split("/"))
                if not target.resolve().is_relative_to(base):  # belt and braces after entry_parts
                    raise ArchiveRefused(info.filename, "resolves outside the extraction directory")
                target.parent.mkdir(parents=True, exist_ok=True)
                budget = min(info.file_size, limits.max_bytes - total)
                try:
                    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
                except FileExistsError:
                    raise ArchiveRefused(info.filename, "collides with another entry") from None
                try:
                    with os.fdopen(fd, "wb") as handle, archive.open(info) as stream:
                        total += _copy_limited(stream, handle, budget, info.filename, head_check=info.filename)
                except (zipfile.BadZipFile, EOFError, zlib.error, NotImplementedError, RuntimeError) as exc:
                    raise ArchiveRefused(info.filename, f"corrupt entry ({exc})") from None
                written.append(relative)
            return sorted(written)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
