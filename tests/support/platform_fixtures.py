"""Shared helpers for the platform dataset tests: a platform wired under tmp_path (SQLite + local blobs +
a BentoML home there), small phantom datasets and ZIPs built from them."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterable
from pathlib import Path

import pytest

from core.phantoms import write_dataset
from medplatform.context import Platform, open_platform


def make_platform(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Platform:
    """The platform on ``tmp_path/var`` (SQLite, migrated; blobs in ``tmp_path/var/blobs``); a test module's
    ``platform`` fixture returns this."""
    monkeypatch.setenv("BENTOML_DO_NOT_TRACK", "true")
    data = tmp_path / "var"
    monkeypatch.setenv("MEDREFINE_DATA_DIR", str(data))  # settings read at call time (thumbnail limits)
    return open_platform({"MEDREFINE_DATA_DIR": str(data)}, bentoml_home=tmp_path / "bentoml")


def phantom_folder(root: Path, n: int = 8, size: int = 48, seed: int = 0) -> Path:
    """``root/images/NNNN.png`` + ``root/masks/NNNN.png``: ``n`` ultrasound phantoms of ``size`` px."""
    return write_dataset("ultrasound", n, root, seed=seed, size=size)


def folder_members(folder: Path) -> dict[str, bytes]:
    """Relative POSIX path -> bytes of every file under ``folder``."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def zip_bytes(members: dict[str, bytes] | Iterable[tuple[str, bytes]], *, prefix: str = "",
              compression: int = zipfile.ZIP_DEFLATED, reverse: bool = False) -> bytes:
    """A ZIP of ``members`` (in the given order, or reversed), each name under ``prefix``."""
    items = list(members.items() if isinstance(members, dict) else members)
    if reverse:
        items.reverse()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in items:
            archive.writestr(prefix + name, data)
    return buffer.getvalue()
