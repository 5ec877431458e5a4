"""medplatform.db: migrations from an empty database and from the previous revision (data kept), the ORM
matching the migrated schema, SQLite shared by two processes, and URL defaults from the environment."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.exc import IntegrityError

from medplatform import db, settings

ROOT = Path(__file__).resolve().parents[2]
HEAD = "0003_feedback"


def _url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'platform.sqlite3'}"


def test_revisions_form_one_line_ending_at_head():
    script = ScriptDirectory(str(db.MIGRATIONS_DIR))
    assert script.get_heads() == [HEAD]
    assert [r.revision for r in script.walk_revisions()] == [HEAD, "0002_artifact_version", "0001_initial"]


def test_empty_database_to_head_matches_the_models(tmp_path):
    url = _url(tmp_path)
    assert db.current_revision(url) is None
    db.upgrade(url)
    assert db.current_revision(url) == HEAD
    engine = db.make_engine(url)
    with engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection, opts={"compare_type": True}),
                                db.Base.metadata)
        tables = set(sa.inspect(connection).get_table_names())
        mode = connection.exec_driver_sql("PRAGMA journal_mode").scalar()
        busy = connection.exec_driver_sql("PRAGMA busy_timeout").scalar()
    engine.dispose()
    assert diff == [], f"models and migrations differ; write a migration: {diff}"
    assert {"datasets", "jobs", "model_versions", "aliases", "alembic_version"} <= tables
    assert mode == "wal" and busy == 30000
    db.upgrade(url)  # idempotent at head
    assert db.current_revision(url) == HEAD


def test_upgrade_from_previous_revision_keeps_rows(tmp_path):
    url = _url(tmp_path)
    db.upgrade(url, "0001_initial")
    created = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.timezone.utc)
    hashes = {"artifact_version": "ab" * 32, "weights_sha256": "cd" * 32, "files": {"manifest.json": "ef" * 32}}
    engine = db.make_engine(url)
    with engine.begin() as connection:  # raw SQL: the 0001 schema, not today's models
        connection.execute(sa.text(
            "INSERT INTO model_versions (name, version, hyperparameters, metrics, artifact_hashes, bento_tag, "
            "created_at) VALUES ('default', 1, :hp, :metrics, :hashes, 'default:v1', :created)"),
            {"hp": json.dumps({"epochs": 4}), "metrics": json.dumps({"dice": 0.92}), "hashes": json.dumps(hashes),
             "created": created.replace(tzinfo=None)})
        connection.execute(sa.text("INSERT INTO aliases (name, alias, version, updated_at) "
                                   "VALUES ('default', 'production', 1, :created)"), {"created": created})
    engine.dispose()

    db.upgrade(url)
    assert db.current_revision(url) == HEAD
    with db.session_factory(url)() as session:
        row = session.scalars(sa.select(db.ModelVersion)).one()
        alias = session.scalars(sa.select(db.Alias)).one()
    assert (row.name, row.version, row.bento_tag) == ("default", 1, "default:v1")
    assert row.hyperparameters == {"epochs": 4} and row.metrics == {"dice": 0.92}
    assert row.artifact_hashes == hashes
    assert row.artifact_version == "ab" * 32  # backfilled by 0002 from the JSON recorded at 0001
    assert row.created_at == created  # read back timezone-aware UTC
    assert (alias.alias, alias.version) == ("production", 1)


def test_constraints_hold(tmp_path):
    url = _url(tmp_path)
    db.upgrade(url)
    sessions = db.session_factory(url)
    with sessions.begin() as session:
        session.add(db.ModelVersion(name="m", version=1, bento_tag="m:v1"))
    with pytest.raises(IntegrityError), sessions.begin() as session:
        session.add(db.ModelVersion(name="m", version=1, bento_tag="m:v1"))
    with pytest.raises(IntegrityError), sessions.begin() as session:  # alias to a version that does not exist
        session.add(db.Alias(name="m", alias="production", version=7))
    with pytest.raises(IntegrityError), sessions.begin() as session:
        session.add(db.Job(kind="train", status="paused"))
    with sessions.begin() as session:
        dataset = db.Dataset(name="d", sha256="0" * 64, status="ready", stats={"pairs": 3})
        session.add(dataset)
        session.flush()
        job = db.Job(kind="train", dataset_id=dataset.id, hyperparameters={"epochs": 2})
        session.add(job)
    with sessions() as session:
        job = session.get(db.Job, job.id)
        assert job.status == "queued" and len(job.id) == 32 and job.created_at.tzinfo is not None


def test_a_second_process_writes_while_this_one_holds_a_session(tmp_path):
    url = _url(tmp_path)
    db.upgrade(url)
    sessions = db.session_factory(url)
    with sessions.begin() as session:
        session.add(db.Dataset(name="mine", sha256="1" * 64, status="ready"))
    script = "\n".join([
        "import sys",
        "from medplatform import db",
        "with db.session_factory(sys.argv[1]).begin() as session:",
        "    session.add(db.Dataset(name='worker', sha256='2' * 64, status='error',",
        "                           error={'files': {'masks/a.png': 'no image'}}))",
    ])
    with sessions() as reader:  # an open read transaction in WAL does not block the other process's write
        assert reader.scalars(sa.select(db.Dataset.name)).all() == ["mine"]
        done = subprocess.run([sys.executable, "-c", script, url], cwd=ROOT, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr
    with sessions() as session:
        rows = {d.name: d for d in session.scalars(sa.select(db.Dataset))}
    assert set(rows) == {"mine", "worker"}
    assert rows["worker"].error == {"files": {"masks/a.png": "no image"}}


def test_urls_and_paths_come_from_the_environment(tmp_path):
    env = {"MEDREFINE_DATA_DIR": str(tmp_path / "data")}
    assert settings.db_url(env) == f"sqlite:///{(tmp_path / 'data' / settings.DB_FILE).resolve()}"
    assert (tmp_path / "data").is_dir()
    assert settings.db_url({**env, "MEDREFINE_DB_URL": "postgresql+psycopg://u@h/db"}) == "postgresql+psycopg://u@h/db"
    assert settings.data_dir({}) == Path("var")
    assert settings.blob_root(env) == tmp_path / "data" / "blobs"


def test_write_session_holds_the_write_lock_and_readers_go_on(tmp_path):
    url = _url(tmp_path)
    db.upgrade(url)
    sessions = db.session_factory(url)
    impatient = db.session_factory(db.make_engine(url, busy_timeout_s=0.2))  # another process, in effect
    with db.write_session(sessions) as writer:
        writer.add(db.Dataset(name="first", sha256="3" * 64, status="ready"))
        writer.flush()
        with pytest.raises(sa.exc.OperationalError, match="locked"), db.write_session(impatient) as other:
            other.scalar(sa.select(db.Dataset.id))  # BEGIN IMMEDIATE cannot get the lock before "first" commits
        with impatient() as reader:  # WAL: reading is never blocked, and sees only committed rows
            assert reader.scalars(sa.select(db.Dataset.name)).all() == []
    with db.write_session(impatient) as other:
        other.add(db.Dataset(name="second", sha256="4" * 64, status="ready"))
    with sessions() as session:
        assert sorted(session.scalars(sa.select(db.Dataset.name))) == ["first", "second"]


def test_write_session_rolls_back_on_error(tmp_path):
    url = _url(tmp_path)
    db.upgrade(url)
    sessions = db.session_factory(url)
    with pytest.raises(RuntimeError), db.write_session(sessions) as session:
        session.add(db.Dataset(name="half", sha256="5" * 64, status="ready"))
        session.flush()
        raise RuntimeError("ingest failed")
    with sessions() as session:
        assert session.scalars(sa.select(db.Dataset)).all() == []
