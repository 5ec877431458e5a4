"""Datasets: ingest a ZIP, a set of files or a URL (checked, validated with core's readers, content-hashed,
stored as a normalised ZIP), list, describe, thumbnail, delete (refused while a job uses it)."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, NamedTuple

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from core.datasets import MASK_SUFFIX, _split_extension
from medplatform import db, settings
from medplatform.archive import (
    ArchiveRefused,
    archive_magic,
    entry_parts,
    nested_archive_suffix,
    safe_extract,
)
from medplatform.dataset_limits import DatasetLimits
from medplatform.dataset_validation import Validation, validate_folder
from medplatform.errors import Conflict, InvalidValue, NotFound

if TYPE_CHECKING:
    from medplatform.context import Platform

BLOB_PREFIX = "datasets/"
MAX_NAME_CHARS = 200
ACTIVE_JOB_STATUSES = ("queued", "running")
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed member timestamps: the same members give the same ZIP bytes
_CHUNK = 1 << 20

FileSource = bytes | str | os.PathLike[str]


def blob_key(dataset_id: str) -> str:
    """Where a dataset's normalised ZIP lives in the blob store."""
    return f"{BLOB_PREFIX}{dataset_id}.zip"


def check_name(name: str) -> str:
    """A dataset's display name: 1-200 printable characters (stripped); ``InvalidValue`` on ``name``."""
    if not isinstance(name, str) or not name.strip():
        raise InvalidValue("name", name, "a dataset needs a non-empty name")
    name = name.strip()
    if len(name) > MAX_NAME_CHARS:
        raise InvalidValue("name", name[:40] + "...", f"at most {MAX_NAME_CHARS} characters")
    if not name.isprintable():
        raise InvalidValue("name", name, "control characters are not allowed")
    return name


# ----------------------------------------------------------------------------------------------------------
# Ingest
# ----------------------------------------------------------------------------------------------------------


def ingest_zip(platform: Platform, name: str, source: str | os.PathLike[str] | bytes | IO[bytes], *,
               deidentify: bool = False, limits: DatasetLimits | None = None,
               workdir: str | os.PathLike[str] | None = None) -> db.Dataset:
    """Ingest a ZIP of ``images/`` + ``masks/`` (core.datasets' layout; a path, bytes or a binary stream).

    The archive is checked entry by entry before extraction (:mod:`medplatform.archive`), extracted into a
    temporary directory under ``workdir`` (default ``<MEDREFINE_DATA_DIR>/tmp``, removed afterwards),
    then validated and stored by :func:`_ingest_folder`.

    Returns:
        the dataset row: ``status`` ``ready``, or ``error`` with ``error = {"files": {path: reason},
        "problems": [...]}``; the existing row when the same content was uploaded before.

    Raises:
        ArchiveRefused: a hostile or unreadable archive (field ``file``, value the entry at fault).
        InvalidValue: a bad ``name``. Conflict: ``limits.max_datasets`` datasets exist already.
    """
    name = check_name(name)
    limits = limits or DatasetLimits.from_env()
    with _staging(workdir) as stage:
        safe_extract(source, stage / "files", limits)
        return _ingest_folder(platform, name, stage / "files", stage, limits, deidentify)


def ingest_files(platform: Platform, name: str, files: Sequence[tuple[str, FileSource]], *,
                 deidentify: bool = False, limits: DatasetLimits | None = None,
                 workdir: str | os.PathLike[str] | None = None) -> db.Dataset:
    """Ingest a multipart set of files: ``(filename, bytes or a path)`` each.

    A file name with folders (``images/a.png``, ``data/masks/a.png``) is placed as written, so core's layout
    rules apply as to a ZIP; a bare name goes to ``masks/`` when its stem ends in ``_mask`` (BUSI), else to
    ``images/``. Names are checked like archive entries (no ``..``, absolute paths, backslashes), two
    files at one place, nested archives, more than ``max_files`` files or ``max_bytes`` in all are
    refused (``ArchiveRefused``, field ``files``). Otherwise as :func:`ingest_zip`.
    """
    name = check_name(name)
    limits = limits or DatasetLimits.from_env()
    if not files:
        raise InvalidValue("files", 0, "no files uploaded")
    if len(files) > limits.max_files:
        raise ArchiveRefused("<files>", f"{len(files)} files, over the limit of {limits.max_files}", field="files")
    with _staging(workdir) as stage:
        folder = stage / "files"
        folder.mkdir()
        total = 0
        for filename, content in files:
            relative = _placement(filename)
            target = folder.joinpath(*relative.split("/"))
            if target.exists():
                raise ArchiveRefused(filename, f"a second file for {relative}", field="files")
            target.parent.mkdir(parents=True, exist_ok=True)
            total += _write_file(filename, content, target, limits, limits.max_bytes - total)
        return _ingest_folder(platform, name, folder, stage, limits, deidentify)


def ingest_url(platform: Platform, name: str, url: str, *, allow_hosts: Sequence[str] | None = None,
               deidentify: bool = False, limits: DatasetLimits | None = None,
               workdir: str | os.PathLike[str] | None = None) -> db.Dataset:
    """Fetch a ZIP from ``url`` (:func:`medplatform.fetch.fetch_url`; allow-list default from
    MEDREFINE_DATASET_URL_ALLOW, at most ``limits.max_bytes``) and ingest it as :func:`ingest_zip`."""
    from medplatform.fetch import allow_list_from_env, fetch_url

    name = check_name(name)
    limits = limits or DatasetLimits.from_env()
    allow = allow_list_from_env() if allow_hosts is None else tuple(allow_hosts)
    with _staging(workdir) as stage:
        archive = fetch_url(url, allow, limits.max_bytes, dest_dir=stage)
        return ingest_zip(platform, name, archive, deidentify=deidentify, limits=limits, workdir=stage)


def _placement(filename: str) -> str:
    parts = entry_parts(str(filename), field="files")
    if len(parts) > 1:
        return "/".join(parts)
    split = _split_extension(parts[0])
    folder = "masks" if split is not None and split[0].endswith(MASK_SUFFIX) else "images"
    return f"{folder}/{parts[0]}"


def _write_file(filename: str, content: FileSource, target: Path, limits: DatasetLimits, budget: int) -> int:
    """Copy one uploaded file, counting against the per-file and total limits; returns its size."""
    suffix = nested_archive_suffix(filename)
    if suffix is not None:
        raise ArchiveRefused(filename, f"nested archive ({suffix}); upload images and masks", field="files")
    limit = min(limits.max_file_bytes, budget)
    written = 0
    with open(target, "xb") as handle, _opened(content) as stream:
        while chunk := stream.read(_CHUNK):
            if written == 0 and archive_magic(chunk, filename) is not None:
                raise ArchiveRefused(filename, f"nested archive ({archive_magic(chunk, filename)} content)",
                                     field="files")
            written += len(chunk)
            if written > limit:
                raise ArchiveRefused(filename, f"over {limit} bytes (the per-file or total upload limit)",
                                     field="files")
            handle.write(chunk)
    return written


@contextmanager
def _opened(content: FileSource) -> Iterator[IO[bytes]]:
    if isinstance(content, (bytes, bytearray, memoryview)):
        yield io.BytesIO(bytes(content))
    else:
        with open(content, "rb") as handle:
            yield handle


@contextmanager
def _staging(workdir: str | os.PathLike[str] | None) -> Iterator[Path]:
    root = Path(workdir) if workdir is not None else settings.data_dir() / "tmp"
    root.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix="dataset-", dir=root))
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _ingest_folder(platform: Platform, name: str, folder: Path, stage: Path, limits: DatasetLimits,
                   deidentify: bool) -> db.Dataset:
    """Validate, (de-identify,) hash, store and record an extracted upload."""
    # 1. Validate with core's readers; every fault is attributed to its file.
    validation = validate_folder(folder, limits)
    stats: dict[str, Any] = dict(validation.stats)
    # 2. The members that make up the dataset: a valid one keeps images/ + masks/ of its pairs (the root
    #    folder, READMEs and litter dropped); an invalid one is identified by everything it held.
    if validation.ok:
        members = _normalised_members(validation, folder)
        if deidentify:
            stats["deidentified_files"] = _deidentify_members(members, validation, folder)
    else:
        members = {relative: folder / relative for relative in validation.files}
    stats["bytes"] = sum(path.stat().st_size for path in members.values())
    stats["deidentify"] = bool(deidentify)
    digest = canonical_sha256(members)
    # 3. Known content: the existing dataset, nothing stored twice.
    found = _find_by_sha256(platform, digest)
    if found is not None:
        return found
    # 4. Store the normalised ZIP (a valid dataset only: an invalid one has nothing to train on).
    row = db.Dataset(id=db.new_id(), name=name, sha256=digest, status="ready" if validation.ok else "error",
                     stats=stats)
    if validation.ok:
        archive = stage / "normalised.zip"
        write_normalised_zip(members, archive)
        row.blob_key = blob_key(row.id)
        row.stats = {**stats, "archive_bytes": archive.stat().st_size}
        platform.blobs.put_file(row.blob_key, archive)
    else:
        row.error = {"files": dict(sorted(validation.faults.items())), "problems": validation.problems}
    # 5. Record it: count and insert under the write lock, so two uploads cannot both take the last place.
    try:
        with db.write_session(platform.sessions) as session:
            existing = session.scalar(select(db.Dataset).where(db.Dataset.sha256 == digest))
            if existing is None:
                count = session.scalar(select(func.count()).select_from(db.Dataset)) or 0
                if count >= limits.max_datasets:
                    raise Conflict("datasets", count, f"at most {limits.max_datasets} datasets "
                                                      "(MEDREFINE_MAX_DATASETS); delete one first")
                session.add(row)
    except IntegrityError:  # another process recorded the same content between our check and insert
        existing = _find_by_sha256(platform, digest)
        if existing is None:
            raise
    except BaseException:
        if row.blob_key:
            platform.blobs.delete(row.blob_key)
        raise
    if existing is not None:
        if row.blob_key:
            platform.blobs.delete(row.blob_key)
        return existing
    return row


def _normalised_members(validation: Validation, folder: Path) -> dict[str, Path]:
    members = {}
    for image_path, mask_path in validation.pairs.values():
        for relative in (image_path, mask_path):
            members[relative[len(validation.root):]] = folder / relative
    return members


def _deidentify_members(members: dict[str, Path], validation: Validation, folder: Path) -> int:
    from medplatform.deidentify import deidentify_dicom

    count = 0
    for relative, path in members.items():
        if validation.formats.get(validation.root + relative) == "dicom":
            path.write_bytes(deidentify_dicom(path.read_bytes()))
            count += 1
    return count


def canonical_sha256(members: dict[str, Path]) -> str:
    """SHA-256 over the sorted member names and each member's SHA-256: the archive's order, timestamps,
    compression and container do not change it; any name or byte does."""
    digest = hashlib.sha256()
    for relative in sorted(members):
        digest.update(f"{relative}\0{_file_sha256(members[relative])}\n".encode())
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_normalised_zip(members: dict[str, Path], target: Path) -> Path:
    """A deterministic ZIP: members sorted by name, fixed timestamps and modes, deflated."""
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as archive:
        for relative in sorted(members):
            info = zipfile.ZipInfo(relative, date_time=_ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o100644 << 16
            with archive.open(info, "w") as out, open(members[relative], "rb") as source:
                shutil.copyfileobj(source, out, _CHUNK)
    return target


def _find_by_sha256(platform: Platform, digest: str) -> db.Dataset | None:
    with platform.sessions() as session:
        return session.scalar(select(db.Dataset).where(db.Dataset.sha256 == digest))


# ----------------------------------------------------------------------------------------------------------
# Read, thumbnails, delete
# ----------------------------------------------------------------------------------------------------------


def list_datasets(platform: Platform) -> list[db.Dataset]:
    """Every dataset, newest first."""
    with platform.sessions() as session:
        return list(session.scalars(select(db.Dataset).order_by(db.Dataset.created_at.desc(), db.Dataset.id)))


def get_dataset(platform: Platform, dataset_id: str) -> db.Dataset:
    """One dataset by id; ``NotFound`` (field ``dataset``) when absent."""
    with platform.sessions() as session:
        row = session.get(db.Dataset, dataset_id) if isinstance(dataset_id, str) else None
    if row is None:
        raise NotFound("dataset", dataset_id, "no such dataset")
    return row


def describe(row: db.Dataset) -> dict[str, Any]:
    """A dataset as JSON-ready data (what ``GET /datasets/{id}`` answers, without thumbnails)."""
    return {"id": row.id, "name": row.name, "sha256": row.sha256, "status": row.status, "error": row.error,
            "stats": row.stats, "created_at": row.created_at.isoformat()}


class Thumbnail(NamedTuple):
    """A sample's image with its mask overlaid: ``png`` is an RGB PNG whose longer side is at most the size asked."""

    name: str
    png: bytes


def thumbnails(platform: Platform, dataset_id: str, n: int = 4, size: int = 128) -> list[Thumbnail]:
    """Up to ``n`` overlays of the first samples (in name order), generated from the stored ZIP.

    An ``error`` dataset has no stored archive and no thumbnails (``[]``).
    """
    from core.datasets import SegmentationDataset, resize_image, resize_mask
    from core.imageio import encode_png
    from core.phantoms import overlay

    if not 1 <= int(n) <= 64:
        raise InvalidValue("n", n, "between 1 and 64 thumbnails")
    if not 16 <= int(size) <= 1024:
        raise InvalidValue("size", size, "a thumbnail side between 16 and 1024 pixels")
    row = get_dataset(platform, dataset_id)
    if row.blob_key is None:
        return []
    limits = DatasetLimits.from_env()
    with _stored_archive(platform, row.blob_key) as archive:
        samples = SegmentationDataset(archive, validate=False, max_pixels=limits.max_pixels,
                                      max_bytes=limits.max_file_bytes)
        out = []
        for index in range(min(int(n), len(samples))):
            image, mask, name = samples[index]
            height, width = image.shape
            scale = min(1.0, size / max(height, width))
            shape = (max(1, round(height * scale)), max(1, round(width * scale)))
            out.append(Thumbnail(name, encode_png(overlay(resize_image(image, shape), resize_mask(mask, shape)))))
    return out


@contextmanager
def _stored_archive(platform: Platform, key: str) -> Iterator[Path]:
    from medplatform.blobs import LocalBlobStore

    if isinstance(platform.blobs, LocalBlobStore):  # read in place; no copy of a large archive
        yield platform.blobs.root.joinpath(*key.split("/"))
        return
    with tempfile.TemporaryDirectory(prefix="dataset-") as tmp:
        yield platform.blobs.get_file(key, Path(tmp) / "dataset.zip")


def delete_dataset(platform: Platform, dataset_id: str) -> None:
    """Delete a dataset's row and its stored archive.

    Raises:
        NotFound: no such dataset (field ``dataset``).
        Conflict: a ``queued`` or ``running`` job uses it (field ``dataset``; the message lists the jobs).
    """
    with db.write_session(platform.sessions) as session:  # a job cannot be queued on it meanwhile
        row = session.get(db.Dataset, dataset_id)
        if row is None:
            raise NotFound("dataset", dataset_id, "no such dataset")
        jobs = list(session.scalars(select(db.Job.id).where(
            db.Job.dataset_id == dataset_id, db.Job.status.in_(ACTIVE_JOB_STATUSES))))
        if jobs:
            raise Conflict("dataset", dataset_id,
                           f"used by {len(jobs)} queued or running job(s): {', '.join(sorted(jobs))}; "
                           "cancel them or wait for them to finish")
        key = row.blob_key
        session.delete(row)
    if key:
        platform.blobs.delete(key)
