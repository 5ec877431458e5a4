"""The Makefile's user-facing promises, read from ``make -n`` (nothing is run): install announces each step,
HOST reaches ``python -m service``, ``make test`` fails a run that writes into the tree."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def _dry_run(*args: str) -> list[str]:
    # Run as a top-level make even inside `make test`: no inherited flags, no "Entering directory" lines.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES")}
    done = subprocess.run(["make", "--no-print-directory", "-n", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_install_prints_a_line_before_every_step():
    lines = _dry_run("-W", "pyproject.toml", ".venv/.installed")  # as if pyproject changed: the full recipe
    steps = [i for i, line in enumerate(lines) if " -m venv " in line or " -m pip install " in line]
    assert len(steps) == 5, lines
    for index, step in enumerate(steps, start=1):
        before = [line for line in lines[:step] if line.startswith("echo ")]
        assert before and before[-1].startswith(f'echo "install {index}/5: '), (step, lines)
    assert lines[-1].startswith('echo "install: done')


def test_host_reaches_python_m_service():
    serve = [line for line in _dry_run("-o", "export", "serve", "HOST=0.0.0.0", "PORT=3100") if "-m service" in line]
    assert serve and "--host 0.0.0.0 --port 3100" in serve[0]
    default = [line for line in _dry_run("-o", "export", "serve") if "-m service" in line]
    assert "--host 127.0.0.1 " in default[0]


def test_make_test_fails_a_run_that_writes_into_the_tree():
    pytest_line = [line for line in _dry_run("-o", ".venv/.installed", "-o", "browser", "test") if "pytest" in line]
    assert pytest_line and pytest_line[0].startswith("MEDREFINE_TREE_CHECK=fail ")


def test_make_screenshots_is_the_step_that_writes_docs_ui_png():
    lines = _dry_run("-o", ".venv/.installed", "-o", "browser", "screenshots")
    assert f"MEDREFINE_SCREENSHOT_OUT={REPO_ROOT}/docs/ui.png" in lines[0] and "tests/ui/test_ui.py" in lines[0]
