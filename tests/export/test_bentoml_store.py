"""`python -m export bentoml`: the artifact set in a BentoML model store (BENTOML_HOME = a tmp dir)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from export.bentoml_store import VERSION_CHARS, store_metadata
from export.graphs import save_random_run
from export.onnx_export import export_artifacts
from inference.manifest import load_manifest, sha256_file

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def art(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bento")
    run_dir = save_random_run("tiny", root / "run")
    out = root / "art"
    export_artifacts(run_dir, out, only=["transunet", "gate"])
    return out


def _run(args: list[str], home: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, BENTOML_HOME=str(home), BENTOML_DO_NOT_TRACK="true")
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_register_and_list(art, tmp_path):
    home = tmp_path / "bentoml"
    manifest = load_manifest(art)
    first = _run([sys.executable, "-m", "export", "bentoml", str(art), "--name", "medrefine"], home)
    assert first.returncode == 0, first.stderr
    tag = first.stdout.strip()
    assert tag == f"medrefine:{manifest['version'][:VERSION_CHARS]}"
    # registering the same artifacts again is a no-op with the same tag
    again = _run([sys.executable, "-m", "export", "bentoml", str(art)], home)
    assert again.returncode == 0 and again.stdout.strip() == tag

    listed = _run([str(Path(sys.executable).parent / "bentoml"), "models", "list", "-o", "json"], home)
    assert listed.returncode == 0, listed.stderr
    assert [m["tag"] for m in json.loads(listed.stdout)] == [tag]

    script = ("import bentoml, json, sys; m = bentoml.models.get(sys.argv[1]); "
              "print(json.dumps({'path': m.path, 'labels': m.info.labels, 'metadata': m.info.metadata}))")
    shown = _run([sys.executable, "-c", script, tag], home)
    assert shown.returncode == 0, shown.stderr
    info = json.loads(shown.stdout)
    assert Path(info["path"]).is_relative_to(home)
    assert info["labels"]["graphs"] == "gate+transunet" and info["labels"]["precision"] == "fp32"
    meta = info["metadata"]
    assert meta["version"] == manifest["version"]
    assert meta["pipeline"]["threshold"] == 0.5 and meta["config"]["refiner"]["img_size"] == 256
    assert meta["graphs"]["transunet"]["sha256"] == manifest["graphs"]["transunet"]["sha256"]
    for name in ("manifest.json", "transunet.onnx", "gate.onnx"):
        assert sha256_file(Path(info["path"]) / name) == sha256_file(art / name), name


def test_metadata_is_bentoml_safe(art):
    labels, metadata = store_metadata(load_manifest(art))
    assert all(isinstance(v, str) for v in labels.values())
    assert "data_fingerprint" not in metadata  # None in run.json: dropped, BentoML rejects None

    def walk(value):
        if isinstance(value, dict):
            return all(walk(v) for v in value.values())
        if isinstance(value, list):
            return all(walk(v) for v in value)
        return isinstance(value, (str, int, float, bool))

    assert walk(metadata)


def test_corrupted_artifacts_are_not_registered(art, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in art.iterdir():
        data = bytearray(f.read_bytes())
        if f.name == "transunet.onnx":
            data[100] ^= 0xFF
        (bad / f.name).write_bytes(bytes(data))
    result = _run([sys.executable, "-m", "export", "bentoml", str(bad)], tmp_path / "home")
    assert result.returncode == 1
    assert f"{bad / 'transunet.onnx'}: sha256 mismatch" in result.stderr
    assert not (tmp_path / "home" / "models" / "medrefine").exists()
