"""What every test module shares: the check that a run leaves the git tree as it found it, and the fixtures
used across modules (one live server per session, its artifacts, a browser, an S3 endpoint). Helpers are
imported from ``tests.support``; fixtures are never imported, pytest finds them here."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
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


# A run keeps platform data and BentoML's model store in a directory of its own, never in var/ of the work
# tree or the user's ~/bentoml: a registry left there by another run would answer in place of the artifacts a
# test started its server with. Tests that need their own set these again (monkeypatch, a subprocess env).
PRIVATE_HOMES = {"MEDREFINE_DATA_DIR": "data", "BENTOML_HOME": "bentoml"}
_HOMES = pytest.StashKey[Path]()


def pytest_configure(config: pytest.Config) -> None:
    base = Path(tempfile.mkdtemp(prefix="medrefine-tests-"))
    config.stash[_HOMES] = base
    for variable, folder in PRIVATE_HOMES.items():
        os.environ[variable] = str(base / folder)


def pytest_unconfigure(config: pytest.Config) -> None:
    base = config.stash.get(_HOMES, None)
    if base is not None:
        shutil.rmtree(base, ignore_errors=True)


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


# ---- fixtures shared across modules (helpers live in tests/support/ and are imported from there) -------------
# Imports are deferred into the fixtures: a session that needs none of them loads none of their packages.

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


@pytest.fixture(scope="session")
def service_artifacts(tmp_path_factory: pytest.TempPathFactory):
    """``TinyArtifacts`` exported once per session (see tests/support/artifact_factory.py)."""
    from tests.support.artifact_factory import make_tiny_artifacts

    return make_tiny_artifacts(tmp_path_factory.mktemp("service_artifacts"))


@pytest.fixture(scope="session")
def generator_artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The committed default generators (checkpoints/generators) exported once per session."""
    from export.generators import export_generator_artifacts

    out = tmp_path_factory.mktemp("generator_artifacts") / "generators"
    export_generator_artifacts("default", out)
    return out


@pytest.fixture(scope="session")
def reward_generator_artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generators directory as ``python -m training rlhf`` leaves it (the committed text2image and selector
    runs plus a ``reward`` run: the tiny reward head, seeded, untrained, on the committed selector), exported."""
    import shutil

    import torch

    from export.generators import export_generator_artifacts
    from models.reward import build_reward
    from training.rlhf import RewardTrainConfig, save_reward_run
    from weights.generators import GENERATORS_DIR, load_selector

    root = tmp_path_factory.mktemp("reward_generators")
    runs = root / "generators"
    for name in ("text2image", "selector"):
        shutil.copytree(GENERATORS_DIR / name, runs / name)
    with torch.random.fork_rng():  # seeded here without moving the session's global generator
        torch.manual_seed(0)
        reward = build_reward("tiny", load_selector(runs / "selector"))
    save_reward_run(runs / "reward", reward, {}, n_ratings=0, config=RewardTrainConfig(), seed=0,
                    ratings_source="none")
    export_generator_artifacts(runs, root / "art")
    return root / "art"


@pytest.fixture(scope="session")
def live_server(service_artifacts, generator_artifacts, tmp_path_factory: pytest.TempPathFactory):
    """One real ``python -m service`` for the session on loopback, generators included (API key on: use
    ``server.client()`` or ``server.headers()``); stopped (SIGTERM, drain) when the session ends."""
    from tests.support.service_fixtures import start_server

    server = start_server(service_artifacts.art_dir, tmp_path_factory.mktemp("live_server"),
                          env={"MEDREFINE_GENERATORS": str(generator_artifacts)})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory):
    """Headless Debian Chromium driven by Selenium, for the /ui tests (``make browser`` installs both)."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("headless UI test needs apt packages chromium and chromium-driver")
    from selenium import webdriver

    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager go online
    profile = tmp_path_factory.mktemp("chromium-profile")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 f"--user-data-dir={profile}", "--window-size=1400,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=str(CHROMEDRIVER)))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def moto_endpoint():
    """``http://127.0.0.1:<port>`` of moto's ThreadedMotoServer (the real HTTP protocol boto3 speaks to AWS)."""
    from moto.server import ThreadedMotoServer

    from tests.support.service_fixtures import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_env(moto_endpoint, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Test credentials in the environment (boto3 reads them there) and the MEDREFINE_S3_* settings."""
    from tests.support.platform_s3 import S3_ENV

    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return {**S3_ENV, "MEDREFINE_S3_BUCKET": "medrefine-test", "MEDREFINE_S3_ENDPOINT_URL": moto_endpoint}
