"""Platform metadata: SQLAlchemy 2 models (datasets, jobs, model versions, aliases), engines and migrations.

``upgrade(url)`` migrates to head; ``session_factory``/``write_session`` hand out sessions; nothing at import.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    CheckConstraint,
    DateTime,
    Engine,
    Float,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
SQLITE_BUSY_TIMEOUT_S = 30.0  # a worker's write waits this long for the server's (and back) before failing
DATASET_STATUSES = ("ready", "error")
JOB_KINDS = ("train", "evaluate", "predict")
JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
FEEDBACK_KINDS = ("segmentation", "generation")  # generation: ratings of generated images (issue #20, later)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def new_id() -> str:
    """32 hex characters (uuid4): dataset and job ids, unguessable in URLs."""
    return uuid.uuid4().hex


class UTCDateTime(TypeDecorator[dt.datetime]):
    """A timezone-aware UTC datetime on every backend (SQLite stores it naive; this re-attaches UTC on load)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: platform timestamps are timezone-aware UTC")
        return None if value is None else value.astimezone(dt.timezone.utc)

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None or value.tzinfo is not None:
            return value
        return value.replace(tzinfo=dt.timezone.utc)


def _one_of(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON, dt.datetime: UTCDateTime}


class Dataset(Base):
    """An uploaded dataset: its archive in the blob store under ``blob_key``, content-hashed (one row per content).

    ``stats``: counts and sizes (e.g. ``{"pairs": 40, "bytes": 123456, ...}``); ``error``: when ``status`` is
    ``error``, ``{"files": {path: reason, ...}, ...}`` naming the files at fault.
    """

    __tablename__ = "datasets"
    __table_args__ = (CheckConstraint(_one_of("status", DATASET_STATUSES), name="ck_datasets_status"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200))
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    status: Mapped[str] = mapped_column(String(16))
    error: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    stats: Mapped[dict[str, Any]] = mapped_column(default=dict)
    blob_key: Mapped[str | None] = mapped_column(String(512), default=None)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Job(Base):
    """A queued unit of work (train, evaluate, predict) run outside the serving process.

    ``progress``: e.g. ``{"phase": "e2e", "epoch": 3, "epochs": 10, "train_loss": 0.2, "val_dice": 0.9}``;
    ``worker_id``/``worker_pid``/``heartbeat_at`` say who runs it and whether it is alive; ``result``: e.g.
    ``{"model": "name", "version": 3}`` for a train job that registered a version.
    """

    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(_one_of("kind", JOB_KINDS), name="ck_jobs_kind"),
        CheckConstraint(_one_of("status", JOB_STATUSES), name="ck_jobs_status"),
        Index("ix_jobs_status_created_at", "status", "created_at"),  # the queue: oldest queued job first
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    kind: Mapped[str] = mapped_column(String(16))
    dataset_id: Mapped[str | None] = mapped_column(
        String(32), ForeignKey("datasets.id", ondelete="SET NULL"), default=None)
    recipe: Mapped[str | None] = mapped_column(String(64), default=None)
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(default=dict)
    status: Mapped[str] = mapped_column(String(16), default="queued")
    progress: Mapped[dict[str, Any]] = mapped_column(default=dict)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    worker_id: Mapped[str | None] = mapped_column(String(128), default=None)
    worker_pid: Mapped[int | None] = mapped_column(Integer, default=None)
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    log_blob_key: Mapped[str | None] = mapped_column(String(512), default=None)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    started_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    finished_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    result: Mapped[dict[str, Any] | None] = mapped_column(default=None)


class ModelVersion(Base):
    """One registered version of a named model: integer ``version`` counts up per ``name`` from 1.

    ``metrics``: ``{"dice", "iou", "precision", "recall", "hd95", "threshold", "source", ...}`` (None where
    not measured); ``artifact_hashes``: ``{"artifact_version", "weights_sha256", "files": {file: sha256}}``;
    ``artifact_version``: the artifact manifest's version (sha256), indexed to find a version by its bytes.
    """

    __tablename__ = "model_versions"
    __table_args__ = (
        UniqueConstraint("name", "version", name="uq_model_versions_name_version"),
        Index("ix_model_versions_artifact_version", "artifact_version"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(63))
    version: Mapped[int] = mapped_column(Integer)
    dataset_id: Mapped[str | None] = mapped_column(
        String(32), ForeignKey("datasets.id", ondelete="SET NULL"), default=None)
    dataset_sha256: Mapped[str | None] = mapped_column(String(64), default=None)
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    artifact_hashes: Mapped[dict[str, Any]] = mapped_column(default=dict)
    artifact_version: Mapped[str | None] = mapped_column(String(64), default=None)
    bento_tag: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    job_id: Mapped[str | None] = mapped_column(String(32), ForeignKey("jobs.id", ondelete="SET NULL"), default=None)
    # Deleting a version keeps its row (metrics stay comparable, numbers are never reused) and drops its files.
    deleted_at: Mapped[dt.datetime | None] = mapped_column(default=None)


class Alias(Base):
    """A movable name (``production``, ``staging``...) for one version of a model; unique per (name, alias)."""

    __tablename__ = "aliases"
    __table_args__ = (
        UniqueConstraint("name", "alias", name="uq_aliases_name_alias"),
        ForeignKeyConstraint(["name", "version"], ["model_versions.name", "model_versions.version"],
                             name="fk_aliases_model_version"),  # a version with an alias cannot vanish
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(63))
    alias: Mapped[str] = mapped_column(String(63))
    version: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Feedback(Base):
    """One piece of user feedback, grouped into a named feedback ``dataset`` (not a ``datasets`` row: those are
    immutable by content; ``medplatform.feedback.snapshot`` turns the cases into one for a train job).

    ``segmentation``: ``image_key``/``mask_key`` in the blob store (image de-identified, mask PNG 0/255),
    ``model_name``/``model_version`` produced the starting mask, ``seconds``/``prompts`` the correction took;
    ``details``: ``{"format", "height", "width", "mask_pixels"}``. ``generation`` (later): the rating in
    ``details``, no blobs.
    """

    __tablename__ = "feedback"
    __table_args__ = (
        CheckConstraint(_one_of("kind", FEEDBACK_KINDS), name="ck_feedback_kind"),
        Index("ix_feedback_kind_dataset_created_at", "kind", "dataset", "created_at"),  # a dataset, oldest first
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    kind: Mapped[str] = mapped_column(String(16))
    dataset: Mapped[str] = mapped_column(String(200))
    model_name: Mapped[str | None] = mapped_column(String(63), default=None)
    model_version: Mapped[int | None] = mapped_column(Integer, default=None)
    image_key: Mapped[str | None] = mapped_column(String(512), default=None)
    mask_key: Mapped[str | None] = mapped_column(String(512), default=None)
    image_sha256: Mapped[str | None] = mapped_column(String(64), default=None)
    seconds: Mapped[float | None] = mapped_column(Float, default=None)
    prompts: Mapped[int | None] = mapped_column(Integer, default=None)
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


WRITE = "medplatform_write"  # execution option: this transaction writes (SQLite: BEGIN IMMEDIATE)


def make_engine(url: str, *, busy_timeout_s: float = SQLITE_BUSY_TIMEOUT_S, **kwargs: Any) -> Engine:
    """An engine for ``url``; SQLite gets WAL, a busy timeout and enforced foreign keys on every connection,
    so the server and worker processes can share one file, and ``BEGIN IMMEDIATE`` for ``write_session``."""
    sqlite = url.startswith("sqlite")
    if sqlite:
        kwargs.setdefault("connect_args", {}).setdefault("timeout", busy_timeout_s)
    engine = create_engine(url, **kwargs)
    if sqlite:
        event.listen(engine, "connect", lambda dbapi, record: _sqlite_connect(dbapi, busy_timeout_s))
        event.listen(engine, "begin", _sqlite_begin)
    return engine


def _sqlite_connect(dbapi_connection: Any, busy_timeout_s: float) -> None:
    # The driver's own transaction handling is off: SQLAlchemy's "begin" event below emits BEGIN, so that a
    # writer can take the write lock up front (pysqlite would only BEGIN at the first INSERT/UPDATE).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")  # readers never block the writer, and the other way round
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")  # safe with WAL; a commit does not fsync the main file
    finally:
        cursor.close()


def _sqlite_begin(connection: Any) -> None:
    immediate = connection.get_execution_options().get(WRITE)
    connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


@contextmanager
def write_session(sessions: sessionmaker[Session]) -> Iterator[Session]:
    """A session whose transaction holds the database's write lock from its first statement to its commit.

    Use it for read-then-write steps that must not interleave with another process (next version number,
    claiming the oldest queued job): on SQLite it is ``BEGIN IMMEDIATE`` (others wait up to the busy
    timeout); on other databases lock the rows you read with ``select(...).with_for_update()``.
    Commits on success, rolls back on an exception.
    """
    with sessions() as session:
        session.connection(execution_options={WRITE: True})
        yield session
        session.commit()


def session_factory(url_or_engine: str | Engine) -> sessionmaker[Session]:
    """Sessions on one engine; objects stay readable after commit (``expire_on_commit=False``)."""
    engine = make_engine(url_or_engine) if isinstance(url_or_engine, str) else url_or_engine
    return sessionmaker(engine, expire_on_commit=False)


def upgrade(url_or_engine: str | Engine, revision: str = "head") -> None:
    """Run the Alembic migrations of ``medplatform/migrations`` up to ``revision`` (default: the newest).

    SQLite runs them with foreign keys off (a migration that rebuilds a table must not cascade into the
    rows that reference it) and checks them afterwards.
    """
    from alembic import command

    engine = make_engine(url_or_engine) if isinstance(url_or_engine, str) else url_or_engine
    try:
        with engine.connect() as connection:
            sqlite = connection.dialect.name == "sqlite"
            if sqlite:  # on the driver connection: outside any transaction, where SQLite honours it
                connection.connection.driver_connection.execute("PRAGMA foreign_keys=OFF")
            try:
                with connection.begin():
                    command.upgrade(migration_config(connection), revision)
                    broken = connection.exec_driver_sql("PRAGMA foreign_key_check").all() if sqlite else []
                    if broken:
                        raise RuntimeError(f"migration to {revision} left foreign keys broken: {broken[:5]}")
            finally:
                if sqlite:
                    connection.connection.driver_connection.execute("PRAGMA foreign_keys=ON")
    finally:
        if isinstance(url_or_engine, str):
            engine.dispose()


def current_revision(url_or_engine: str | Engine) -> str | None:
    """The revision a database is at (None: never migrated)."""
    from alembic.runtime.migration import MigrationContext

    engine = make_engine(url_or_engine) if isinstance(url_or_engine, str) else url_or_engine
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        if isinstance(url_or_engine, str):
            engine.dispose()


def migration_config(connection: Any) -> Any:
    """An Alembic ``Config`` for this package's migrations, bound to an open connection (no alembic.ini)."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    return config
