"""``python -m medplatform``: migrate, register, default, models, versions and alias, against a data dir and
BENTOML_HOME under tmp_path; refusals exit 1 with one line naming the field."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory

from medplatform import db
from medplatform.cli import main
from tests.support.artifact_factory import session_tiny_artifacts

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def env(tmp_path, monkeypatch) -> dict[str, str]:
    values = {"MEDREFINE_DATA_DIR": str(tmp_path / "data"), "BENTOML_HOME": str(tmp_path / "bentoml"),
              "BENTOML_DO_NOT_TRACK": "true"}
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    for key in ("MEDREFINE_DB_URL", "MEDREFINE_S3_BUCKET"):
        monkeypatch.delenv(key, raising=False)
    return values


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medplatform", *args], cwd=ROOT, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=300)


def test_migrate_and_register_as_a_process(env, tmp_path_factory, tmp_path):
    migrated = _cli(["migrate"], env)
    assert migrated.returncode == 0, migrated.stderr
    out = json.loads(migrated.stdout)
    # The newest migration script, read from the scripts themselves, so a new migration needs no edit here.
    head = ScriptDirectory(str(db.MIGRATIONS_DIR)).get_current_head()
    assert out["revision"] == db.current_revision(out["db_url"]) == head
    assert Path(out["db_url"].removeprefix("sqlite:///")) == (tmp_path / "data" / "medplatform.sqlite3").resolve()

    pair = session_tiny_artifacts(tmp_path_factory)
    registered = _cli(["register", str(pair.run_dir), str(pair.art_dir), "--name", "tiny", "--alias", "production"],
                      env)
    assert registered.returncode == 0, registered.stderr
    version = json.loads(registered.stdout)
    assert (version["version"], version["aliases"], version["bento_tag"]) == (1, ["production"], "tiny:v1")
    mirrored = tmp_path / "data" / "blobs" / "models" / "tiny" / "artifacts" / version["artifact_version"]
    assert (mirrored / "manifest.json").is_file()


def test_models_versions_alias_default_in_process(env, tmp_path_factory, capsys):
    default = session_tiny_artifacts(tmp_path_factory, use_default_checkpoint=True)
    tiny = session_tiny_artifacts(tmp_path_factory)
    assert main(["default", "--run-dir", str(default.run_dir), "--art-dir", str(default.art_dir)]) == 0
    assert json.loads(capsys.readouterr().out)["aliases"] == ["production"]
    assert main(["register", str(tiny.run_dir), str(tiny.art_dir), "--name", "default"]) == 0
    capsys.readouterr()

    assert main(["models"]) == 0
    assert json.loads(capsys.readouterr().out) == [
        {"name": "default", "versions": [1, 2], "latest": 2, "aliases": {"production": 1}}]
    assert main(["alias", "default", "production", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["aliases"] == ["production"]
    assert main(["versions", "default"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(v["version"], v["aliases"]) for v in listed] == [(1, []), (2, ["production"])]
    assert all({"dice", "iou", "threshold"} <= set(v["metrics"]) for v in listed)


def test_refusals_exit_1_naming_the_field(env, capsys):
    assert main(["alias", "nothing", "production", "3"]) == 1
    assert capsys.readouterr().err.startswith("error: version: ")
    assert main(["versions", "nothing"]) == 1
    assert capsys.readouterr().err.startswith("error: name: ")
    assert main(["register", "/no/run", "/no/art", "--name", "x", "--evaluation", "/no/eval.json"]) == 1
    assert capsys.readouterr().err.startswith("error: evaluation: ")
    with pytest.raises(SystemExit) as usage:
        main(["alias", "default", "production", "three"])
    assert usage.value.code == 2


def test_register_mirrors_to_s3_when_the_bucket_is_configured(env, s3_env, monkeypatch, tmp_path_factory,
                                                              tmp_path, capsys):
    import boto3

    for key in ("MEDREFINE_S3_BUCKET", "MEDREFINE_S3_ENDPOINT_URL"):
        monkeypatch.setenv(key, s3_env[key])
    client = boto3.client("s3", endpoint_url=s3_env["MEDREFINE_S3_ENDPOINT_URL"], region_name="us-east-1")
    client.create_bucket(Bucket=s3_env["MEDREFINE_S3_BUCKET"])
    tiny = session_tiny_artifacts(tmp_path_factory)
    assert main(["register", str(tiny.run_dir), str(tiny.art_dir), "--name", "tiny"]) == 0
    hashes = json.loads(capsys.readouterr().out)["artifact_hashes"]
    prefix = f"models/tiny/artifacts/{hashes['artifact_version']}/"
    listed = client.list_objects_v2(Bucket=s3_env["MEDREFINE_S3_BUCKET"], Prefix=prefix)
    assert sorted(o["Key"] for o in listed["Contents"]) == sorted(f"{prefix}{f}" for f in hashes["files"])
    assert not (tmp_path / "data" / "blobs").exists()  # nothing went to the local store
