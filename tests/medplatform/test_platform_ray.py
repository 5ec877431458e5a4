"""The Ray Jobs runner against a real local Ray head (GCS, raylet, dashboard with the job API) that the test starts
and stops inside a private network namespace with only ``lo`` (``unshare --net``), so nothing Ray binds is
reachable from outside: a tiny train job submitted as a Ray job registers a version; a running Ray job is cancelled
(stop_job) and the job's row ends cancelled."""

from __future__ import annotations

import ipaddress
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from medplatform import jobs
from tests.support.platform_jobs_fixtures import add_phantom_dataset, open_test_platform, platform_env
from tests.support.ray_netns_driver import MARK, processes_using, stop_head

pytest.importorskip("ray.job_submission", reason="ray[default] is in the dev extra")

REPO = Path(__file__).resolve().parents[2]
RAY = Path(sys.executable).with_name("ray")


def _free_port() -> int:
    """A port free on the host too, so a connection to it from here can only reach Ray if Ray leaked out."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _require_unshare() -> None:
    """Fail, naming what is missing, rather than start Ray where it would listen on the machine's interfaces."""
    unshare = shutil.which("unshare")
    probe = subprocess.run([unshare, "--net", "true"], capture_output=True, text=True) if unshare else None
    if probe is None or probe.returncode != 0:
        pytest.fail("this test runs Ray only inside a private network namespace and needs `unshare --net` "
                    "(util-linux, as root): " + ("unshare not found" if probe is None else
                                                 f"`unshare --net true` exited {probe.returncode}: {probe.stderr}"))


class Driver:
    """``tests/support/ray_netns_driver.py`` under ``unshare --net``: its JSON lines and its ``go`` answers."""

    def __init__(self, cfg: dict[str, Any], env: dict[str, str], stderr_path: Path) -> None:
        self.stderr_path = stderr_path
        self._stderr = open(stderr_path, "wb")  # noqa: SIM115 (closed in close())
        self.proc = subprocess.Popen(
            ["unshare", "--net", "--", sys.executable, "-m", "tests.support.ray_netns_driver"],
            cwd=REPO,
            env={**env, "RAYNETNS_CFG": json.dumps(cfg)},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )

    def next_event(self, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 1.0)
            if not ready:
                continue
            line = self.proc.stdout.readline()
            if not line:
                break
            if line.startswith(MARK):
                event = json.loads(line[len(MARK):])
                assert event["event"] != "error", f"the Ray driver failed:\n{event['traceback']}"
                return event
        raise AssertionError(f"no event from the Ray driver within {timeout_s:.0f} s (exit {self.proc.poll()}); "
                             f"stderr: {self.stderr_path.read_text(errors='replace')[-3000:]}")

    def go(self) -> None:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)
        self._stderr.close()


def _assert_only_loopback(sockets: list[dict[str, Any]], stage: str) -> None:
    outside = [s for s in sockets if not ipaddress.ip_address(s["ip"].removeprefix("::ffff:")).is_loopback]
    assert not outside, f"{stage}: Ray bound non-loopback addresses inside the namespace: {outside}"


def _assert_host_sees_none(temp_dir: str, sockets: list[dict[str, Any]], dashboard: int, stage: str) -> None:
    """From the host's network namespace: Ray's processes run, yet none of their sockets is in the host's
    table and the job API's port does not answer."""
    ray_pids = {p.pid for p in processes_using(temp_dir)} | {s["pid"] for s in sockets if s["pid"]}
    assert processes_using(temp_dir), f"{stage}: no Ray process found from the host"
    leaked = [c for c in psutil.net_connections(kind="inet") if c.pid in ray_pids]
    assert not leaked, f"{stage}: Ray sockets visible in the host's network namespace: {leaked}"
    with socket.socket() as s, pytest.raises(ConnectionRefusedError):
        s.settimeout(10)
        s.connect(("127.0.0.1", dashboard))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray-jobs")
    env = platform_env(root)
    platform = open_test_platform(env)
    dataset = add_phantom_dataset(platform, root / "phantoms")
    # What the Ray job needs to reach the same database and stores (a real cluster sets these in its image).
    ray_env = {k: env[k] for k in ("MEDREFINE_DATA_DIR", "BENTOML_HOME", "MEDREFINE_JOB_HEARTBEAT_S",
                                   "MEDREFINE_JOB_DEVICE", "OMP_NUM_THREADS")}
    ray_env["PYTHONPATH"] = str(REPO)
    return {"root": root, "env": env, "platform": platform, "dataset": dataset, "ray_env": ray_env}


def test_ray_in_a_private_namespace_runs_a_tiny_train_job_and_cancels_a_running_one(world):
    _require_unshare()
    platform, dataset = world["platform"], world["dataset"]
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's unix sockets live under it
    ports = {name: _free_port() for name in ("gcs", "dashboard", "client", "agent")}
    cfg = {"host_netns": os.readlink("/proc/self/ns/net"), "temp_dir": temp_dir, "ray": str(RAY), "ports": ports,
           "dataset_id": dataset.id, "ray_env": world["ray_env"]}
    driver = Driver(cfg, world["env"], world["root"] / "driver.stderr")
    try:
        ready = driver.next_event(180)
        assert ready["interfaces"] == ["lo"] and ready["netns"] != cfg["host_netns"]
        assert {ports["gcs"], ports["dashboard"]} <= {s["port"] for s in ready["sockets"]}, ready["sockets"]
        _assert_only_loopback(ready["sockets"], "head started")
        _assert_host_sees_none(temp_dir, ready["sockets"], ports["dashboard"], "head started")
        driver.go()

        ran = driver.next_event(600)  # both jobs ended; Ray (workers, job supervisors) still up
        _assert_only_loopback(ran["sockets"], "after the jobs")
        _assert_host_sees_none(temp_dir, ran["sockets"], ports["dashboard"], "after the jobs")
        driver.go()

        done = driver.next_event(120)
        assert driver.proc.wait(60) == 0
    finally:
        driver.close()
        stop_head(None, temp_dir, grace_s=5)  # anything the driver left behind, if it was killed
    assert not processes_using(temp_dir)

    from medplatform.ray_runner import submission_id

    tiny, long = done["tiny"], done["long"]
    assert tiny["submission"] == submission_id(tiny["id"])
    assert tiny["local_claim"] is None  # handed to Ray: a local worker's claim skipped it
    assert tiny["ray_status"] == "SUCCEEDED", tiny["ray_logs"]
    assert tiny["status"] == "succeeded", (tiny["error"], tiny["ray_logs"])
    assert tiny["worker_id"].startswith(f"ray:{submission_id(tiny['id'])}@")
    # The rows and the registry as the host reads them (same SQLite file and blob directory).
    assert jobs.get_job(platform, tiny["id"]).status == "succeeded"
    info = platform.registry.get_version("raytiny", 1)
    assert info.job_id == tiny["id"] and info.dataset_sha256 == dataset.sha256 and info.metrics["n_cases"] == 2
    assert "transunet epoch 1/1" in jobs.job_log(platform, tiny["id"])

    assert long["ray_status"] == "STOPPED", long["ray_logs"]
    assert long["status"] == "cancelled" and long["error"] == "cancelled by request"
    ended = jobs.get_job(platform, long["id"])
    assert ended.status == "cancelled" and ended.error == "cancelled by request"
    assert [v.version for v in platform.registry.list_versions("raytiny")] == [1]
