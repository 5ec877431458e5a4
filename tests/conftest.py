"""Session-wide checks shared by every test module: a test run leaves the git tree as it found it.

Session fixtures stay in tests/service_fixtures.py (``pytest_plugins = ["service_fixtures"]``) for now.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
# MEDREFINE_TREE_CHECK: "fail" (`make test`, hence CI) fails the session, "warn" (the default: in a working
# tree others edit during the run, their new files show up too) only lists the entries, "off" skips it.
TREE_CHECK_ENV = "MEDREFINE_TREE_CHECK"
TREE_CHECK_MODES = ("fail", "warn", "off")
# (work tree, session start as a Unix time, git status entries at the start)
_START = pytest.StashKey[tuple[Path, float, set[tuple[str, str]]]]()


def _git_root() -> Path | None:
    """The work tree holding tests/, or None outside git (an sdist, a container build context)."""
    try:
        done = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=HERE, capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return Path(done.stdout.strip()) if done.returncode == 0 else None


def _porcelain(root: Path) -> set[tuple[str, str]]:
    """``git status`` as ``{(XY, path)}``, untracked files listed one by one (ignored ones are not)."""
    done = subprocess.run(["git", "status", "--porcelain=v1", "-z", "--untracked-files=all"], cwd=root,
                          capture_output=True, text=True, timeout=60, check=True)
    entries: set[tuple[str, str]] = set()
    fields = iter(done.stdout.split("\0"))
    for field in fields:
        if not field:
            continue
        code, path = field[:2], field[3:]
        if code[0] in "RC":
            next(fields, None)  # a rename's source path follows as its own field
        entries.add((code, path))
    return entries


def _written_since(root: Path, entries: set[tuple[str, str]], started: float) -> list[str]:
    """Entries a process in this session could have made: a changed worktree side written since the start.

    A purely staged change (``M `` / ``A ``) is someone's ``git add``, and a file untouched since the start
    that shows up anew is someone's commit; neither is a test writing into the tree.
    """
    found = []
    for code, path in sorted(entries, key=lambda e: e[1]):
        if code[1] == " ":
            continue
        target = root / path
        if target.exists() and target.stat().st_mtime < started:
            continue
        found.append(f"{code} {path}")
    return found


def _mode() -> str:
    mode = os.environ.get(TREE_CHECK_ENV, "warn")
    if mode not in TREE_CHECK_MODES:
        raise pytest.UsageError(f"{TREE_CHECK_ENV}: expected one of {', '.join(TREE_CHECK_MODES)}, got {mode!r}")
    return mode


def pytest_sessionstart(session: pytest.Session) -> None:
    if _mode() == "off":
        return
    root = _git_root()
    if root is not None:
        session.config.stash[_START] = (root, time.time() - 1.0, _porcelain(root))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Names every file the run wrote or changed inside the tree; fails the session (exit status 1) in
    ``fail`` mode."""
    start = session.config.stash.get(_START, None)
    if start is None:
        return
    root, started, before = start
    new = _written_since(root, _porcelain(root) - before, started)
    if not new:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    lines = [f"the test run changed the git tree ({len(new)} entries); tests must write into tmp_path:",
             *(f"    {line}" for line in new)]
    if reporter is not None:
        reporter.write_sep("=", "tree not clean", red=True)
        for line in lines:
            reporter.write_line(line, red=True)
    if _mode() == "fail" and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture
def single_thread_torch():
    """torch on one intra-op thread for the test, so a float reduction sums in one order whatever the machine's
    core count (the stored-slice tests compare against numbers taken that way); restored afterwards."""
    import torch  # here, not at the top: most modules never ask for it and the import takes seconds

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
