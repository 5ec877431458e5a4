"""medplatform.registry: the committed default becomes ``default`` v1 = ``production``; versions count up and
are never reused; aliases move; deleting an aliased version is refused; ``materialize`` re-hashes and restores
from the blob mirror; ``bentoml models list`` shows every version. BENTOML_HOME is always under tmp_path."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from medplatform import db
from medplatform.bento import BentoModels
from medplatform.blobs import LocalBlobStore
from medplatform.errors import AliasInUse, Conflict, IntegrityFailure, InvalidValue, NotFound
from medplatform.registry import (
    ModelRegistry,
    artifacts_prefix,
    ensure_default_registered,
    parse_model_spec,
    run_prefix,
)
from tests.support.artifact_factory import session_tiny_artifacts
from tests.support.platform_s3 import fresh_s3_store
from weights.checkpoints import file_sha256

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def default_pair(tmp_path_factory):
    """checkpoints/default exported to ONNX (once per session, shared with the service tests)."""
    pair = session_tiny_artifacts(tmp_path_factory, use_default_checkpoint=True)
    assert pair.from_default_checkpoint, "checkpoints/default is committed"
    return pair


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """A seeded random tiny run and its export: a second, different trained model."""
    return session_tiny_artifacts(tmp_path_factory)


@pytest.fixture(autouse=True)
def _bentoml_env(tmp_path, monkeypatch):
    """Nothing reaches the user's ~/bentoml, and BentoML sends no usage events."""
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "bentoml"))
    monkeypatch.setenv("BENTOML_DO_NOT_TRACK", "true")


@pytest.fixture
def registry(tmp_path) -> ModelRegistry:
    url = f"sqlite:///{tmp_path / 'platform.sqlite3'}"
    db.upgrade(url)
    return ModelRegistry(db.session_factory(url), LocalBlobStore(tmp_path / "blobs"),
                         BentoModels(tmp_path / "bentoml"))


def test_default_model_is_version_1_in_production(registry, default_pair, tmp_path):
    info = ensure_default_registered(registry, run_dir=default_pair.run_dir, art_dir=default_pair.art_dir)
    assert (info.name, info.version, info.bento_tag) == ("default", 1, "default:v1")
    resolved = registry.resolve("default")
    assert resolved.version == 1 and resolved.aliases == ("production",)

    run = json.loads((default_pair.run_dir / "run.json").read_text())
    evaluation = json.loads((default_pair.run_dir / "eval_test.json").read_text())
    metrics = resolved.metrics
    for key in ("dice", "iou", "precision", "recall", "hd95"):
        assert metrics[key] == evaluation["refined"]["mean"][key], key
    assert metrics["threshold"] == run["threshold"] and metrics["source"] == "evaluation"
    assert resolved.hyperparameters["epochs"] == run["training"]["settings"]["epochs"]
    manifest = json.loads((default_pair.art_dir / "manifest.json").read_text())
    assert resolved.artifact_version == manifest["version"]
    assert resolved.artifact_hashes["weights_sha256"] == run["weights_sha256"]

    again = ensure_default_registered(registry, run_dir=default_pair.run_dir, art_dir=default_pair.art_dir)
    assert again.version == 1 and [v.version for v in registry.list_versions("default")] == [1]

    # Mirrored to the blob store byte for byte: the artifacts and the run directory.
    blobs = registry.blobs
    for graph in manifest["graphs"].values():
        key = f"{artifacts_prefix('default', manifest['version'])}{graph['file']}"
        assert file_sha256(blobs.get_file(key, tmp_path / "check" / graph["file"])) == graph["sha256"]
    runs = run_prefix("default", run["weights_sha256"])
    assert blobs.exists(f"{runs}weights.safetensors") and blobs.exists(f"{runs}run.json")

    env = dict(os.environ, BENTOML_HOME=str(tmp_path / "bentoml"), BENTOML_DO_NOT_TRACK="true")
    listed = subprocess.run([sys.executable, "-m", "bentoml", "models", "list", "-o", "json"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert [m["tag"] for m in json.loads(listed.stdout)] == ["default:v1"]


def test_versions_aliases_delete_and_numbers_never_reused(registry, default_pair, tiny_pair):
    ensure_default_registered(registry, run_dir=default_pair.run_dir, art_dir=default_pair.art_dir)
    v2 = registry.register(tiny_pair.run_dir, tiny_pair.art_dir, name="default", job_id=None)
    assert v2.version == 2 and v2.metrics["source"] == "run.json validation"
    assert v2.metrics["dice"] == json.loads((tiny_pair.run_dir / "run.json").read_text())["metrics"]["val_dice"]
    assert v2.metrics["iou"] is None  # not measured without an evaluation: None, never guessed

    compared = registry.list_versions("default")
    assert [(v.version, v.aliases) for v in compared] == [(1, ("production",)), (2, ())]
    assert compared[0].metrics["dice"] != compared[1].metrics["dice"]

    registry.set_alias("default", "production", 2)  # promote
    assert registry.resolve("default").version == 2
    assert registry.resolve("default", "@production").version == 2
    assert registry.resolve("default", 1).version == 1
    assert registry.resolve(*parse_model_spec("default:1")).version == 1
    with pytest.raises(AliasInUse) as refused:
        registry.delete_version("default", 2)
    assert refused.value.field == "version" and refused.value.aliases == ["production"]

    registry.set_alias("default", "production", 1)  # roll back, then delete v2
    registry.delete_version("default", 2)
    assert [v.version for v in registry.list_versions("default")] == [1]
    assert registry.bento.tags() == ["default:v1"]
    assert registry.blobs.list(artifacts_prefix("default", v2.artifact_version)) == []
    assert registry.blobs.list(run_prefix("default", v2.artifact_hashes["weights_sha256"])) == []
    assert registry.blobs.list(artifacts_prefix("default", compared[0].artifact_version))  # v1's stay
    with pytest.raises(NotFound) as gone:
        registry.resolve("default", 2)
    assert gone.value.field == "version" and gone.value.value == 2

    v3 = registry.register(tiny_pair.run_dir, tiny_pair.art_dir, name="default")
    assert v3.version == 3  # 2 is never handed out again
    assert [m.to_dict() for m in registry.list_models()] == [
        {"name": "default", "versions": [1, 3], "latest": 3, "aliases": {"production": 1}}]


def test_resolve_and_alias_errors_name_the_field(registry, tiny_pair):
    with pytest.raises(NotFound) as no_model:
        registry.resolve("nothing")
    assert no_model.value.field == "name"
    registry.register(tiny_pair.run_dir, tiny_pair.art_dir, name="tiny")
    with pytest.raises(NotFound) as no_alias:
        registry.resolve("tiny")  # registered, but nothing is in production yet
    assert no_alias.value.field == "alias" and no_alias.value.value == "production"
    with pytest.raises(NotFound) as no_version:
        registry.set_alias("tiny", "staging", 9)
    assert no_version.value.field == "version"
    with pytest.raises(InvalidValue) as bad_alias:
        registry.set_alias("tiny", "Prod!", 1)
    assert bad_alias.value.field == "alias"
    for spec in ("", "Bad:1", "tiny:x", "tiny@", "a:1@b"):
        with pytest.raises(InvalidValue) as bad_spec:
            parse_model_spec(spec)
        assert bad_spec.value.field == "model"
    assert parse_model_spec("tiny") == ("tiny", None)
    assert parse_model_spec("tiny@staging") == ("tiny", "@staging")


def test_register_refuses_bad_sources_and_leaves_nothing(registry, default_pair, tiny_pair, tmp_path):
    with pytest.raises(Conflict) as mismatch:  # artifacts exported from other weights than this run
        registry.register(tiny_pair.run_dir, default_pair.art_dir, name="mixed")
    assert mismatch.value.field == "art_dir"
    with pytest.raises(InvalidValue) as bad_name:
        registry.register(tiny_pair.run_dir, tiny_pair.art_dir, name="Not A Tag")
    assert bad_name.value.field == "name"
    with pytest.raises(InvalidValue) as no_run:
        registry.register(tmp_path / "missing", tiny_pair.art_dir, name="tiny")
    assert no_run.value.field == "run_dir"
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_pair.art_dir, corrupt)
    graph = next(corrupt.glob("*.onnx"))
    graph.write_bytes(graph.read_bytes()[:-1] + b"\0")
    with pytest.raises(IntegrityFailure) as flipped:
        registry.register(tiny_pair.run_dir, corrupt, name="tiny")
    assert graph.name in str(flipped.value)
    assert registry.list_models() == [] and registry.bento.tags() == [] and registry.blobs.list() == []


def test_materialize_verifies_hashes_and_restores_from_the_mirror(registry, tiny_pair):
    info = registry.register(tiny_pair.run_dir, tiny_pair.art_dir, name="tiny")
    path = registry.materialize("tiny", 1)
    assert path.is_relative_to(registry.bento.home)
    for file, sha in info.artifact_hashes["files"].items():
        assert file_sha256(path / file) == sha

    registry.bento.delete("tiny:v1")  # a new machine: same database and blob store, empty BentoML store
    restored = registry.materialize("tiny", 1)
    assert registry.bento.tags() == ["tiny:v1"]
    assert {p.name for p in restored.iterdir() if p.is_file()} >= set(info.artifact_hashes["files"])

    graph = next(restored.glob("*.onnx"))
    graph.write_bytes(graph.read_bytes() + b"tampered")
    with pytest.raises(IntegrityFailure) as tampered:
        registry.materialize("tiny", 1)
    assert tampered.value.field == str(graph)


def test_concurrent_registrations_get_distinct_numbers(registry, tiny_pair):
    results: list[int] = []
    errors: list[BaseException] = []

    def register() -> None:
        try:
            results.append(registry.register(tiny_pair.run_dir, tiny_pair.art_dir, name="race").version)
        except BaseException as exc:  # collected: the assertion below reports it
            errors.append(exc)

    threads = [threading.Thread(target=register) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    assert sorted(results) == [1, 2, 3]
    assert registry.bento.tags("race") == ["race:v1", "race:v2", "race:v3"]
    shared = artifacts_prefix("race", registry.get_version("race", 1).artifact_version)
    registry.delete_version("race", 1)  # v2 and v3 are the same bytes: the mirror stays
    assert registry.blobs.list(shared) and registry.bento.tags("race") == ["race:v2", "race:v3"]
    registry.delete_version("race", 2)
    registry.delete_version("race", 3)
    assert registry.blobs.list(shared) == [] and registry.blobs.list() == []


def test_s3_mirror_restores_a_version_on_a_new_machine(tmp_path, request, s3_env, tiny_pair):
    """Two machines share the database and an S3 bucket; the second has an empty BentoML store."""
    url = f"sqlite:///{tmp_path / 'platform.sqlite3'}"
    db.upgrade(url)
    bucket = fresh_s3_store(request, s3_env["MEDREFINE_S3_ENDPOINT_URL"])
    first = ModelRegistry(db.session_factory(url), bucket, BentoModels(tmp_path / "bentoml-a"))
    info = first.register(tiny_pair.run_dir, tiny_pair.art_dir, name="tiny")
    prefix = artifacts_prefix("tiny", info.artifact_version)
    assert set(bucket.list(prefix)) == {f"{prefix}{f}" for f in info.artifact_hashes["files"]}

    second = ModelRegistry(db.session_factory(url), bucket, BentoModels(tmp_path / "bentoml-b"))
    assert second.bento.tags() == []
    path = second.materialize("tiny", 1)
    assert path.is_relative_to(tmp_path / "bentoml-b") and second.bento.tags() == ["tiny:v1"]
    for file, sha in info.artifact_hashes["files"].items():
        assert file_sha256(path / file) == sha


def test_servers_starting_together_register_the_default_once(registry, tiny_pair):
    results: list[int] = []
    errors: list[BaseException] = []

    def start() -> None:
        try:
            results.append(ensure_default_registered(registry, run_dir=tiny_pair.run_dir,
                                                     art_dir=tiny_pair.art_dir).version)
        except BaseException as exc:  # collected: the assertion below reports it
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    assert results == [1, 1, 1]
    assert [(v.version, v.aliases) for v in registry.list_versions("default")] == [(1, ("production",))]
    assert registry.bento.tags() == ["default:v1"]


def test_a_stale_bentoml_tag_is_never_overwritten(tmp_path, default_pair, tiny_pair):
    """A fresh database beside a BentoML store that already holds ``x:v1`` with other bytes: refused."""
    home = BentoModels(tmp_path / "bentoml")
    old = ModelRegistry(db.session_factory(_migrated(tmp_path / "old.sqlite3")), LocalBlobStore(tmp_path / "b1"), home)
    old.register(default_pair.run_dir, default_pair.art_dir, name="x")
    new = ModelRegistry(db.session_factory(_migrated(tmp_path / "new.sqlite3")), LocalBlobStore(tmp_path / "b2"), home)
    with pytest.raises(Conflict) as stale:
        new.register(tiny_pair.run_dir, tiny_pair.art_dir, name="x")
    assert stale.value.field == "bento_tag" and stale.value.value == "x:v1"
    assert new.list_models() == []
    assert old.materialize("x", 1).is_dir()  # the old bytes are intact


def _migrated(path: Path) -> str:
    url = f"sqlite:///{path}"
    db.upgrade(url)
    return url


def test_generator_versions_say_how_they_were_trained():
    from medplatform.provenance import generator_metrics

    genseg = generator_metrics({"phase": "genseg"}, {"source": {"kind": "genseg", "consistency": {"dice": 0.8}}})
    rlhf = generator_metrics({"phase": "rlhf", "metrics": {"steps": 300}}, {"source": {"kind": "generators"}})
    stage_one = generator_metrics({}, {"source": {"kind": "generators"}})
    assert (genseg["trained_by"], genseg["consistency_dice"], genseg["dice"]) == ("genseg", 0.8, None)
    assert (rlhf["trained_by"], rlhf["run_metrics"]) == ("rlhf", {"steps": 300})
    assert stage_one["trained_by"] == "pix2pix"
