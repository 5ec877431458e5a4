"""Packaging: ``bentoml build`` offline into a temporary BENTOML_HOME, the built Bento serves, and the
Dockerfile has the structure the deployment relies on (non-root, health check, ports, the README command)."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from service.settings import ServiceSettings, parse_cli

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    from pip._vendor import tomli as tomllib


REPO_ROOT = Path(__file__).resolve().parents[2]

BENTOML = [sys.executable, "-m", "bentoml"]
SOURCE_DIRS = ("core", "models", "weights", "inference", "service", "export")
OFFLINE = {  # any attempt to reach a package index or the internet fails fast
    "PIP_NO_INDEX": "1",
    "HTTP_PROXY": "http://127.0.0.1:9",
    "HTTPS_PROXY": "http://127.0.0.1:9",
    "NO_PROXY": "127.0.0.1,localhost",
    "BENTOML_DO_NOT_TRACK": "True",
}


def _pyproject_dependencies() -> list[str]:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def _bentofile() -> dict:
    return yaml.safe_load((REPO_ROOT / "bentofile.yaml").read_text())


@pytest.fixture(scope="module")
def built_bento(service_artifacts, generator_artifacts, tmp_path_factory):
    """Build from a clean copy of the sources plus the tiny artifacts as artifacts/default and the
    exported default generators as artifacts/generators."""
    work = tmp_path_factory.mktemp("bento")
    context = work / "context"
    context.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in SOURCE_DIRS:
        shutil.copytree(REPO_ROOT / name, context / name, ignore=ignore)
    for name in ("pyproject.toml", "bentofile.yaml"):
        shutil.copy2(REPO_ROOT / name, context / name)
    shutil.copytree(service_artifacts.art_dir, context / "artifacts" / "default")
    shutil.copytree(generator_artifacts, context / "artifacts" / "generators")
    home = work / "bentoml_home"
    env = {**_clean_env(), **OFFLINE, "BENTOML_HOME": str(home)}
    done = subprocess.run([*BENTOML, "build", "--output", "tag"], cwd=context, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    tag = re.search(r"__tag__:(\S+)", done.stdout).group(1)
    name, version = tag.split(":")
    return {"tag": tag, "dir": home / "bentos" / name / version, "home": home, "env": env}


def _clean_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith(("MEDREFINE_", "BENTOML_"))}


def test_bentofile_packages_are_the_pyproject_dependencies():
    python = _bentofile()["python"]
    assert python["packages"] == _pyproject_dependencies()
    assert python["lock_packages"] is False  # locking would resolve against an index: no offline build


def test_bentoml_build_packs_service_ui_and_artifacts(built_bento, service_artifacts, generator_artifacts):
    bento = built_bento["dir"]
    spec = yaml.safe_load((bento / "bento.yaml").read_text())
    assert spec["service"] == "service.app:MedRefine" and spec["name"] == "medrefine"
    assert spec["services"][0]["config"]["workers"] == 1
    routes = {route["route"] for route in spec["schema"]["routes"]}
    assert routes == {"/segment", "/refine", "/generate", "/synthesize"}
    src = bento / "src"
    for path in ("service/app.py", "inference/pipeline.py", "service/ui/index.html", "service/ui/app.js",
                 "core/imageio.py", "models/gate.py", "export/graphs.py", "artifacts/default/manifest.json"):
        assert (src / path).is_file(), path
    manifest = json.loads((service_artifacts.art_dir / "manifest.json").read_text())
    for graph in manifest["graphs"].values():
        assert (src / "artifacts" / "default" / graph["file"]).read_bytes() == (
            service_artifacts.art_dir / graph["file"]).read_bytes()
    generators = json.loads((generator_artifacts / "manifest.json").read_text())
    for entry in [*generators["graphs"].values(), *generators.get("assets", {}).values()]:
        assert (src / "artifacts" / "generators" / entry["file"]).is_file(), entry["file"]
    assert not list(src.rglob("__pycache__")) and not (src / "tests").exists() and not (src / "training").exists()
    requirements = (bento / "env" / "python" / "requirements.txt").read_text().split()
    for dependency in _pyproject_dependencies():
        assert dependency in requirements


def test_built_bento_serves_with_bentoml_serve(built_bento, service_artifacts):
    from tests.support.service_fixtures import free_port

    port = free_port()
    env = {**built_bento["env"], "MEDREFINE_GRPC_PORT": "0", "MEDREFINE_INTRA_OP_THREADS": "1"}
    process = subprocess.Popen([*BENTOML, "serve", built_bento["tag"], "--host", "127.0.0.1", "--port", str(port)],
                               env=env, cwd=built_bento["home"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        deadline, body = time.monotonic() + 120, None
        while time.monotonic() < deadline and process.poll() is None:
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
                if response.status_code == 200:
                    body = response.json()
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        assert body is not None, "built Bento never became ready"
        manifest = json.loads((service_artifacts.art_dir / "manifest.json").read_text())
        assert body["model_version"] == manifest["version"] and body["backend"] == "onnxruntime"
    finally:
        process.terminate()
        try:
            output = process.communicate(timeout=60)[0].decode(errors="replace")
        except subprocess.TimeoutExpired:
            process.kill()
            output = process.communicate()[0].decode(errors="replace")
    assert process.returncode == 0, output[-3000:]


# ---------------------------------------------------------------------------------------------------
# Dockerfile
# ---------------------------------------------------------------------------------------------------


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    result = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def _final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    starts = [i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM"]
    return instructions[starts[-1]:]


def test_dockerfile_runs_the_readme_install_and_serve_commands_as_non_root():
    instructions = _instructions((REPO_ROOT / "Dockerfile").read_text())
    froms = [rest for keyword, rest in instructions if keyword == "FROM"]
    assert len(froms) >= 2 and all(" AS " in f.upper() for f in froms), "multi-stage with named stages"
    final = _final_stage(instructions)

    users = [rest for keyword, rest in final if keyword == "USER"]
    assert users and users[-1] not in ("root", "0") and not users[-1].startswith("0:")
    exposed = {port for keyword, rest in final if keyword == "EXPOSE" for port in rest.split()}
    assert {"3000", "8001"} <= exposed
    health = " ".join(rest for keyword, rest in final if keyword == "HEALTHCHECK")
    assert "/readyz" in health and "CMD" in health

    cmd = json.loads(next(rest for keyword, rest in final if keyword == "CMD"))
    assert cmd[:3] == ["python", "-m", "service"]
    args = parse_cli(cmd[3:])  # the real CLI accepts it
    assert (args.host, args.port, args.grpc_port) == ("0.0.0.0", 3000, 8001)
    assert args.api_key_env and args.artifacts
    # the engine is the environment's: `-e MEDREFINE_BACKEND=openvino` switches an EXTRAS=openvino image
    assert ServiceSettings.from_args(args, {"MEDREFINE_BACKEND": "openvino"}).backend == "openvino"
    assert ServiceSettings.from_args(args, {}).backend == "onnxruntime"

    env_text = " ".join(rest for keyword, rest in final if keyword == "ENV")
    assert "MEDREFINE_REQUIRE_API_KEY=1" in env_text, "the image refuses to start without an API key"
    copies = [rest for keyword, rest in final if keyword == "COPY" and args.artifacts in rest]
    assert copies and "--chown=root" in copies[0] and re.search(r"--chmod=0?5[0-5][0-5]\b", copies[0]), \
        "the model directory is owned by root and not writable"

    build_runs = " ".join(rest for keyword, rest in instructions if keyword == "RUN")
    assert re.search(r"pip install [^&;]*torch==2\.13\.0", build_runs)
    # the declared dependencies (read from pyproject.toml), then the code without them, each its own step
    assert "pip install -r /tmp/requirements.txt" in build_runs and re.search(r"pip install --no-deps \.", build_runs)
    assert re.search(r"ARG DEVICE=cpu\b", "\n".join(f"{k} {r}" for k, r in instructions))

    dockerignore = (REPO_ROOT / ".dockerignore").read_text().split()
    assert ".venv" in dockerignore and ".git" in dockerignore


def test_readme_commands_match_the_cli_and_the_install():
    text = (REPO_ROOT / "README.md").read_text()
    commands = re.findall(r"python -m service\b([^\n`]*)", text)
    assert commands, "README shows how to serve (python -m service ...)"
    for tail in commands:
        parse_cli(shlex.split(tail.split("#")[0].strip().rstrip("\\")))
    assert "torch==2.13.0" in text
