"""Shared pieces of the job tests: a platform in a temporary directory, an 8-case phantom dataset stored the way
``medplatform.datasets`` stores one (a ``Dataset`` row and a ZIP of images/ + masks/ in the blob store), polling."""

from __future__ import annotations

import io
import os
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.phantoms import write_dataset
from medplatform.context import Platform, open_platform
from medplatform.db import Dataset


def platform_env(root: Path, **extra: str) -> dict[str, str]:
    """This process's environment plus a data directory, BentoML home and fast worker timings under ``root``."""
    env = dict(os.environ)
    env.update(MEDREFINE_DATA_DIR=str(root / "data"), BENTOML_HOME=str(root / "bento"),
               MEDREFINE_CACHE_DIR=str(root / "cache"), MEDREFINE_JOB_HEARTBEAT_S="1", MEDREFINE_JOB_POLL_S="0.2",
               MEDREFINE_JOB_DEVICE="cpu", OMP_NUM_THREADS="1", **extra)
    env.pop("MEDREFINE_DB_URL", None)
    env.pop("MEDREFINE_S3_BUCKET", None)
    return env


def open_test_platform(env: dict[str, str]) -> Platform:
    return open_platform(env, bentoml_home=env["BENTOML_HOME"])


def add_phantom_dataset(platform: Platform, folder: Path, *, count: int = 8, seed: int = 3) -> Dataset:
    """``count`` 64 px phantom ultrasound cases uploaded as a ZIP through the datasets layer; returns the row."""
    from medplatform.datasets import ingest_zip

    write_dataset("ultrasound", count, folder, seed, size=64)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for path in sorted(folder.rglob("*.png")):
            zf.write(path, path.relative_to(folder).as_posix())
    dataset = ingest_zip(platform, folder.name, buffer.getvalue())
    assert dataset.status == "ready", dataset.error
    return dataset


def wait_for(check: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.2) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)
