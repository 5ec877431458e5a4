"""Where platform data lives, from the environment: MEDREFINE_DATA_DIR, MEDREFINE_DB_URL, the blob store's root.

Read when called (never at import), so tests and workers set the environment first.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

DEFAULT_DATA_DIR = "var"
DB_FILE = "medplatform.sqlite3"


def data_dir(env: Mapping[str, str] | None = None) -> Path:
    """``MEDREFINE_DATA_DIR`` (default ``var/`` relative to the working directory)."""
    env = os.environ if env is None else env
    return Path(env.get("MEDREFINE_DATA_DIR") or DEFAULT_DATA_DIR)


def db_url(env: Mapping[str, str] | None = None) -> str:
    """``MEDREFINE_DB_URL``, else ``sqlite:///<data dir>/medplatform.sqlite3`` (its directory is created)."""
    env = os.environ if env is None else env
    url = env.get("MEDREFINE_DB_URL")
    if url:
        return url
    root = data_dir(env)
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(root / DB_FILE).resolve()}"


def blob_root(env: Mapping[str, str] | None = None) -> Path:
    """The local blob store's root: ``<data dir>/blobs``."""
    return data_dir(env) / "blobs"
