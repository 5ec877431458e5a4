"""tests/conftest.py fails a session whose tests wrote into the git tree, and passes one that used tmp_path."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TREE_CHECK_ENV

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent

LEAKY = '''
from pathlib import Path

def test_writes_into_the_tree():
    Path(__file__).resolve().parent.parent.joinpath("docs", "ui.png").write_bytes(b"new picture")
    Path(__file__).resolve().parent.joinpath("leftover.json").write_text("{}")
'''

TIDY = '''
def test_writes_into_tmp_path(tmp_path):
    (tmp_path / "ui.png").write_bytes(b"new picture")
'''


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, timeout=60)


@pytest.fixture()
def repo(tmp_path: Path) -> Path:
    """A git repo with a committed docs/ui.png, this project's .gitignore and its tests/conftest.py."""
    root = tmp_path / "repo"
    (root / "tests").mkdir(parents=True)
    (root / "docs").mkdir()
    (root / "docs" / "ui.png").write_bytes(b"committed picture")
    shutil.copy2(REPO_ROOT / ".gitignore", root / ".gitignore")
    shutil.copy2(HERE / "conftest.py", root / "tests" / "conftest.py")
    (root / "pytest.ini").write_text("[pytest]\n")
    _git(root, "init", "-q")
    _git(root, "add", ".")
    _git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "init")
    return root


def _pytest(repo: Path, body: str, mode: str | None = "fail") -> subprocess.CompletedProcess:
    (repo / "tests" / "test_inner.py").write_text(body)
    # Caches on: .pytest_cache and __pycache__ (git-ignored) must not count as leaks.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", TREE_CHECK_ENV)}
    if mode is not None:
        env[TREE_CHECK_ENV] = mode
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "tests"], cwd=repo, capture_output=True,
                          text=True, timeout=120, env=env)


def test_a_session_that_writes_into_the_tree_fails_naming_the_files(repo):
    (repo / "tests" / "test_inner.py").write_text(TIDY)
    _git(repo, "add", "tests/test_inner.py")  # only the leaks must show up, not the test file itself
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "inner")
    done = _pytest(repo, LEAKY)
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert "1 passed" in out and "tree not clean" in out
    assert " M docs/ui.png" in out and "?? tests/leftover.json" in out
    assert "test_inner.py" not in out  # changed before the session began: not the run's doing


def test_a_session_writing_into_tmp_path_passes_with_caches_on(repo):
    done = _pytest(repo, TIDY)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (repo / ".pytest_cache").is_dir() and list((repo / "tests").glob("__pycache__/*.pyc"))
    assert "tree not clean" not in done.stdout


def test_by_default_the_leaks_are_listed_without_failing_the_session(repo):
    done = _pytest(repo, LEAKY, mode=None)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "tree not clean" in done.stdout and " M docs/ui.png" in done.stdout

