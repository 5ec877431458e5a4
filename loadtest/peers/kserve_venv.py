"""The KServe peer's own virtual environment: kserve's pins clash with ours, so it never enters our venv."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

from loadtest.system import REPO_ROOT

__all__ = ["KSERVE_VERSION", "ensure_kserve_venv", "peer_env", "requirements", "venv_dir"]

KSERVE_VERSION = "0.21.0"
# the libraries the pipeline computes with, pinned to ours; kserve brings its own server stack
SHARED_LIBRARIES = ("onnxruntime", "numpy", "pillow", "scipy", "torch")
MARKER = ".medrefine-requirements"


def requirements() -> list[str]:
    """pip requirement lines: ``kserve==0.21.0`` and ours of :data:`SHARED_LIBRARIES`, e.g. ``numpy==2.4.6``."""
    return [f"kserve=={KSERVE_VERSION}", *(f"{name}=={version(name)}" for name in SHARED_LIBRARIES)]


def venv_dir() -> Path:
    root = Path(os.environ.get("MEDREFINE_PEER_VENVS", Path.home() / ".cache" / "medrefine" / "peer-venvs"))
    return root / f"kserve-{KSERVE_VERSION}"


def ensure_kserve_venv(*, log=None) -> Path:
    """The KServe venv's python, creating or rebuilding the venv when its requirements changed.

    Raises:
        RuntimeError: ``python -m venv`` or ``pip install`` failed (the command and its output tail).
    """
    home = venv_dir()
    python = home / "bin" / "python"
    wanted = "\n".join(requirements()) + "\n"
    marker = home / MARKER
    if python.is_file() and marker.is_file() and marker.read_text() == wanted:
        return python
    started = time.perf_counter()
    if log is not None:
        log(f"creating the KServe peer's virtual environment {home} ({', '.join(requirements())})")
    home.parent.mkdir(parents=True, exist_ok=True)
    for cmd in ([sys.executable, "-m", "venv", "--clear", str(home)],
                [str(python), "-m", "pip", "install", "--quiet", *requirements()]):
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(cmd)} failed (exit {done.returncode}):\n{(done.stdout + done.stderr)[-2000:]}"
            )
    marker.write_text(wanted)
    if log is not None:
        log(f"  created in {time.perf_counter() - started:.0f} s")
    return python


def peer_env() -> dict[str, str]:
    """Environment for a peer process run from the KServe venv: our repository on ``PYTHONPATH``."""
    return {"PYTHONPATH": str(REPO_ROOT)}
