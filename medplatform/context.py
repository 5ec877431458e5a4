"""``open_platform()``: the database (migrated), blob store, BentoML store and registry wired from the
environment, the one entry point the service, workers and the CLI share."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from medplatform import db, settings
from medplatform.bento import BentoModels
from medplatform.blobs import BlobStore, blob_store_from_env
from medplatform.registry import ModelRegistry


@dataclass(frozen=True)
class Platform:
    """Everything below the HTTP layer, built once per process."""

    db_url: str
    sessions: sessionmaker[Session]
    blobs: BlobStore
    bento: BentoModels
    registry: ModelRegistry


def open_platform(env: Mapping[str, str] | None = None, *, migrate: bool = True,
                  bentoml_home: str | os.PathLike[str] | None = None) -> Platform:
    """Wire the platform from MEDREFINE_DB_URL / MEDREFINE_DATA_DIR / MEDREFINE_S3_* / BENTOML_HOME.

    ``migrate``: run the Alembic migrations to head first (what the server and CLI do at start).
    """
    env = os.environ if env is None else env
    url = settings.db_url(env)
    engine = db.make_engine(url)
    if migrate:
        db.upgrade(engine)
    sessions = db.session_factory(engine)
    blobs = blob_store_from_env(env)
    home = bentoml_home if bentoml_home is not None else env.get("BENTOML_HOME") or None
    bento = BentoModels(Path(home) if home else None)
    return Platform(db_url=url, sessions=sessions, blobs=blobs, bento=bento,
                    registry=ModelRegistry(sessions, blobs, bento))
