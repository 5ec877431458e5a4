"""Blob storage for dataset archives, run directories and artifacts: a ``BlobStore`` protocol and its backends."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Protocol, runtime_checkable

from medplatform import settings
from medplatform.errors import InvalidValue, NotFound

if TYPE_CHECKING:
    from medplatform.s3 import S3BlobStore

MAX_KEY_CHARS = 512
_KEY_CHARS = re.compile(r"^[A-Za-z0-9._\-/@+=]+$")


def validate_key(key: str, *, field: str = "key") -> str:
    """Return ``key`` when it is a relative ``a/b/c`` path; ``InvalidValue`` naming it otherwise.

    Refused: empty, over 512 characters, absolute (``/x``), ``..`` or ``.`` or empty segments, backslashes,
    and characters outside ``[A-Za-z0-9._-/@+=]`` (so a key is the same file name on every backend).
    """
    if not isinstance(key, str) or not key:
        raise InvalidValue(field, key, "a blob key must be a non-empty string")
    if len(key) > MAX_KEY_CHARS:
        raise InvalidValue(field, key[:40] + "...", f"a blob key has at most {MAX_KEY_CHARS} characters")
    if "\\" in key:
        raise InvalidValue(field, key, "backslashes are not allowed in a blob key (use '/')")
    if key.startswith("/"):
        raise InvalidValue(field, key, "a blob key must be relative, not absolute")
    if any(part in ("", ".", "..") for part in key.split("/")):
        raise InvalidValue(field, key, "a blob key may not contain '..', '.' or empty segments")
    if not _KEY_CHARS.match(key):
        raise InvalidValue(field, key, "a blob key may only hold letters, digits and . _ - / @ + =")
    return key


def validate_prefix(prefix: str) -> str:
    """A listing prefix: empty (everything) or a valid key, optionally ending in ``/``."""
    if prefix == "":
        return prefix
    validate_key(prefix.rstrip("/") or prefix, field="prefix")
    return prefix


@runtime_checkable
class BlobStore(Protocol):
    """Bytes under ``a/b/c`` keys. Writes replace whole objects; a reader never sees a partial object."""

    def put_bytes(self, key: str, data: bytes) -> None: ...

    def put_file(self, key: str, path: str | os.PathLike[str]) -> None: ...

    def get_bytes(self, key: str) -> bytes:
        """Raises ``NotFound`` (field ``key``) when absent."""
        ...

    def open(self, key: str) -> IO[bytes]:
        """A readable binary stream; the caller closes it. Raises ``NotFound`` when absent."""
        ...

    def get_file(self, key: str, path: str | os.PathLike[str]) -> Path:
        """Download to ``path`` (parents created); returns it. Raises ``NotFound`` when absent."""
        ...

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> None:
        """Remove a key; absent keys are not an error."""
        ...

    def list(self, prefix: str = "") -> list[str]:
        """Every key that starts with ``prefix``, sorted."""
        ...

    def size(self, key: str) -> int:
        """Bytes stored under ``key``. Raises ``NotFound`` when absent."""
        ...


class LocalBlobStore:
    """A ``BlobStore`` in a directory: key ``a/b`` is ``root/a/b``; writes go to a temp file then ``os.replace``."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root) if root is not None else settings.blob_root()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*validate_key(key).split("/"))

    def _existing(self, key: str) -> Path:
        path = self._path(key)
        if not path.is_file():
            raise NotFound("key", key, f"no blob in {self.root}")
        return path

    @contextmanager
    def _atomic(self, key: str) -> Iterator[IO[bytes]]:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as handle:
                yield handle
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def put_bytes(self, key: str, data: bytes) -> None:
        with self._atomic(key) as handle:
            handle.write(data)

    def put_file(self, key: str, path: str | os.PathLike[str]) -> None:
        with self._atomic(key) as handle, open(path, "rb") as source:
            shutil.copyfileobj(source, handle, 1 << 20)

    def get_bytes(self, key: str) -> bytes:
        return self._existing(key).read_bytes()

    def open(self, key: str) -> IO[bytes]:
        return self._existing(key).open("rb")

    def get_file(self, key: str, path: str | os.PathLike[str]) -> Path:
        source = self._existing(key)
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        return target

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        # Drop emptied directories up to the root, so that list() and the disk agree.
        for parent in path.parents:
            if parent == self.root or not parent.is_relative_to(self.root):
                break
            try:
                parent.rmdir()
            except OSError:
                break

    def list(self, prefix: str = "") -> list[str]:
        validate_prefix(prefix)
        # Walk only the deepest directory the prefix names ("models/a/v1/" -> root/models/a/v1).
        base = self.root.joinpath(*prefix.split("/")[:-1])
        if not base.is_dir():
            return []
        keys = []
        for path in base.rglob("*"):
            if path.is_file() and not path.name.startswith(".tmp-"):
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def size(self, key: str) -> int:
        return self._existing(key).stat().st_size


def blob_store_from_env(env: Mapping[str, str] | None = None) -> BlobStore:
    """``S3BlobStore`` when MEDREFINE_S3_BUCKET is set, else ``LocalBlobStore(<MEDREFINE_DATA_DIR>/blobs)``."""
    env = os.environ if env is None else env
    if env.get("MEDREFINE_S3_BUCKET"):
        from medplatform.s3 import s3_store_from_env

        return s3_store_from_env(env)
    return LocalBlobStore(settings.blob_root(env))


def __getattr__(name: str) -> type[S3BlobStore]:
    if name == "S3BlobStore":  # lazily: importing boto3 costs ~0.3 s that local-only callers need not pay
        from medplatform.s3 import S3BlobStore

        return S3BlobStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
