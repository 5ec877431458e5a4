"""A broken artifact directory never becomes a serving process: one clear stderr line and exit code 2.

``python -m service`` loads and verifies the artifacts before BentoML starts (``service.__main__.preflight``).
Each broken variant of the session's tiny artifacts is a copy with one fault: a graph file missing, a
graph file modified after export (sha256 mismatch), a manifest edited after export, no manifest, and for
``--backend tensorrt`` an engine record built for other artifacts or another GPU. The process must exit 2
without ever listening, and say in ONE line which file or record is at fault and why, with no traceback.

TensorRT is not installed here, so the GPU-mismatch path is tested on the check function itself
(``inference.artifacts.check_tensorrt_engines``) with a fake engine record and an explicit GPU.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from inference.artifacts import ArtifactError, check_tensorrt_engines, load_artifacts
from inference.manifest import sha256_file
from inference.tensorrt_runtime import EngineCompatibilityError, GpuInfo

pytestmark = pytest.mark.timeout(300)

REPO_ROOT = Path(__file__).resolve().parents[2]
H100 = GpuInfo("NVIDIA H100 80GB HBM3", "9.0")


def _copy(service_artifacts, tmp_path: Path, name: str) -> Path:
    target = tmp_path / name
    shutil.copytree(service_artifacts.art_dir, target)
    return target


def _serve(art_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    """``python -m service`` on a port nobody may use; it must exit before ever binding it."""
    return subprocess.run([sys.executable, "-m", "service", "--artifacts", str(art_dir), "--port", "1",
                           "--grpc-port", "0", *extra], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)


def _one_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, (done.returncode, done.stdout[-2000:], done.stderr[-2000:])
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout
    assert lines[0].startswith("python -m service: cannot serve: "), lines[0]
    return lines[0]


def _fake_engines(art_dir: Path, *, gpu: GpuInfo = H100, trt: str = "10.3.0", version: str | None = None) -> Path:
    """``ART_DIR/trt`` as ``python -m export tensorrt`` writes it, with stand-in engine files."""
    trt_dir = art_dir / "trt"
    trt_dir.mkdir()
    manifest = json.loads((art_dir / "manifest.json").read_text())
    engines = {}
    for name in manifest["graphs"]:
        path = trt_dir / f"{name}.plan"
        path.write_bytes(f"serialized engine for {name}".encode())
        engines[name] = {"file": path.name, "sha256": sha256_file(path)}
    record = {"format": "medrefine-trt/1", "artifact_version": version or manifest["version"],
              "gpu": {"name": gpu.name, "compute_capability": gpu.compute_capability},
              "tensorrt_version": trt, "precision": "fp32", "engines": engines}
    (trt_dir / "manifest.json").write_text(json.dumps(record))
    return trt_dir


def test_missing_graph_file(service_artifacts, tmp_path):
    art = _copy(service_artifacts, tmp_path, "missing")
    (art / "mask_decoder.onnx").unlink()
    line = _one_line(_serve(art))
    assert "mask_decoder.onnx: missing" in line


def test_graph_modified_after_export(service_artifacts, tmp_path):
    art = _copy(service_artifacts, tmp_path, "modified")
    graph = art / "transunet.onnx"
    data = bytearray(graph.read_bytes())
    data[-1] ^= 0xFF
    graph.write_bytes(bytes(data))
    line = _one_line(_serve(art))
    assert "transunet.onnx: sha256 mismatch" in line and "re-export" in line


def test_manifest_edited_after_export(service_artifacts, tmp_path):
    art = _copy(service_artifacts, tmp_path, "edited")
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["pipeline"]["threshold"] = 0.3
    (art / "manifest.json").write_text(json.dumps(manifest))
    line = _one_line(_serve(art))
    assert "manifest.json: field 'version'" in line and "edited after export" in line


def test_no_manifest(service_artifacts, tmp_path):
    art = _copy(service_artifacts, tmp_path, "bare")
    (art / "manifest.json").unlink()
    line = _one_line(_serve(art))
    assert "manifest.json: missing" in line


def test_tensorrt_without_engine_record_or_for_other_artifacts(service_artifacts, tmp_path):
    art = _copy(service_artifacts, tmp_path, "no_engines")
    line = _one_line(_serve(art, "--backend", "tensorrt"))
    assert "trt/manifest.json: no TensorRT engine record" in line
    _fake_engines(art, version="0" * 64)
    line = _one_line(_serve(art, "--backend", "tensorrt"))
    assert "engines were built from artifact version 0000000000000000" in line and "rebuild" in line


def test_tensorrt_engines_here_without_tensorrt(service_artifacts, tmp_path):
    """A complete, matching engine record on a machine without TensorRT (this one): one line saying so."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pass
    else:  # pragma: no cover - a GPU machine with TensorRT answers differently (GPU check)
        pytest.skip("tensorrt is installed here; the missing-dependency path does not apply")
    art = _copy(service_artifacts, tmp_path, "engines")
    _fake_engines(art)
    line = _one_line(_serve(art, "--backend", "tensorrt"))
    assert "TensorRT is not installed" in line and "pip install" in line


def test_tensorrt_engine_built_for_another_gpu_is_refused(service_artifacts, tmp_path):
    art = _copy(service_artifacts, tmp_path, "other_gpu")
    _fake_engines(art, gpu=GpuInfo("NVIDIA A10", "8.6"), trt="10.3.0")
    artifacts = load_artifacts(art)
    with pytest.raises(EngineCompatibilityError) as info:
        check_tensorrt_engines(artifacts, gpu=H100, tensorrt_version="10.3.0")
    message = str(info.value)
    assert "\n" not in message
    assert "compute capability 8.6 at build, 9.0 here" in message
    assert "GPU 'NVIDIA A10' at build, 'NVIDIA H100 80GB HBM3' here" in message and "rebuild" in message
    with pytest.raises(EngineCompatibilityError, match=r"TensorRT 10\.3\.0 at build, 10\.5\.0 here"):
        check_tensorrt_engines(artifacts, gpu=GpuInfo("NVIDIA A10", "8.6"), tensorrt_version="10.5.0")
    record = check_tensorrt_engines(artifacts, gpu=GpuInfo("NVIDIA A10", "8.6"), tensorrt_version="10.3.0")
    assert set(record["engines"]) == set(artifacts.graphs)  # the matching machine passes


def test_tensorrt_engine_file_modified_is_refused(service_artifacts, tmp_path):
    art = _copy(service_artifacts, tmp_path, "engine_modified")
    trt_dir = _fake_engines(art)
    (trt_dir / "image_encoder.plan").write_bytes(b"tampered")
    with pytest.raises(ArtifactError, match=r"image_encoder\.plan: sha256 differs from .*trt/manifest\.json"):
        check_tensorrt_engines(load_artifacts(art), gpu=H100, tensorrt_version="10.3.0")
    (trt_dir / "image_encoder.plan").unlink()
    with pytest.raises(ArtifactError, match=r"image_encoder\.plan: missing"):
        check_tensorrt_engines(load_artifacts(art), gpu=H100, tensorrt_version="10.3.0")


def test_the_worker_also_refuses_to_become_ready(service_artifacts, tmp_path):
    """Defence in depth, should the artifacts break after the preflight: building the runtime fails naming
    the file (the worker logs that one line), and without a runtime ``/readyz`` answers 503 with the reason."""
    import asyncio

    import httpx

    from service.app import PROCESS
    from service.middleware import GuardMiddleware
    from service.runtime import ServiceRuntime
    from service.settings import ServiceSettings

    art = _copy(service_artifacts, tmp_path, "late")
    (art / "image_encoder.onnx").write_bytes(b"not onnx")
    with pytest.raises(ArtifactError, match=r"image_encoder\.onnx: sha256 mismatch") as info:
        ServiceRuntime.load(ServiceSettings(artifacts=art, grpc_port=0))
    assert "\n" not in str(info.value)

    async def app(scope, receive, send):  # pragma: no cover - never reached for /readyz
        raise AssertionError("the probe must be answered by the guard")

    failed = type(PROCESS)()
    failed.load_failed = True
    guard = GuardMiddleware(app, runtime=lambda: None, settings=lambda: ServiceSettings(),
                            not_ready_reason=failed.not_ready_reason)

    async def probe():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=guard), base_url="http://w") as client:
            return await client.get("/readyz")

    response = asyncio.run(probe())
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert response.json() == {
        "ready": False,
        "reason": "model artifacts failed to load or verify (see the server log)",
    }


def test_explicit_generator_directory_must_load(service_artifacts, generator_artifacts, tmp_path):
    art_dir = _copy(service_artifacts, tmp_path, "artifacts")
    line = _one_line(_serve(art_dir, "--generators", str(tmp_path / "no-such-generators")))
    assert "no-such-generators" in line and "does not exist" in line
    broken = tmp_path / "generators"
    shutil.copytree(generator_artifacts, broken)
    tokenizer = broken / "tokenizer" / "tokenizer.json"
    tokenizer.write_bytes(tokenizer.read_bytes()[:-10] + b"0123456789")
    line = _one_line(_serve(art_dir, "--generators", str(broken)))
    assert "tokenizer.json" in line and "sha256 mismatch" in line


def test_generators_auto_and_off(service_artifacts, tmp_path):
    from service.settings import ServiceSettings

    art_dir = _copy(service_artifacts, tmp_path, "default")
    assert ServiceSettings(artifacts=art_dir).generators_dir is None  # auto: nothing beside it -> off
    (tmp_path / "generators").mkdir()
    (tmp_path / "generators" / "manifest.json").write_text("{}")
    assert ServiceSettings(artifacts=art_dir).generators_dir == tmp_path / "generators"
    assert ServiceSettings(artifacts=art_dir, generators="off").generators_dir is None
