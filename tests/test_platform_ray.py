"""The Ray Jobs runner against a real local Ray head the test starts (GCS, raylet and dashboard; the dashboard's
HTTP job API on 127.0.0.1) and stops: a tiny train job submitted as a Ray job registers a version; a running
Ray job is cancelled (stop_job) and the job's row ends cancelled."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from medplatform import jobs
from tests.platform_jobs_fixtures import add_phantom_dataset, open_test_platform, platform_env, wait_for

ray_job_submission = pytest.importorskip("ray.job_submission", reason="ray[default] is in the dev extra")

REPO = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).with_name("ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_head(head: subprocess.Popen, temp_dir: str) -> None:
    """End what this test started: the blocking ``ray start`` and every Ray process using its temp dir."""
    head.terminate()
    try:
        head.wait(30)
    except subprocess.TimeoutExpired:
        head.kill()
        head.wait()
    deadline = time.monotonic() + 30
    while True:
        left = []
        for proc in psutil.process_iter(["cmdline"]):
            try:
                if any(temp_dir in part for part in proc.info["cmdline"] or ()):
                    left.append(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    for proc in left:  # still there after 30 s: ours (they run under our temp dir), so end them by pid
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_head():
    """A one-CPU Ray head: GCS on a free port, the dashboard (with the job API) on 127.0.0.1:<free port>."""
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's unix sockets live under it
    dashboard = _free_port()
    cmd = [str(RAY), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--num-cpus", "1",
           "--port", str(_free_port()), "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
           "--dashboard-port", str(dashboard), "--ray-client-server-port", str(_free_port()),
           "--dashboard-agent-listen-port", str(_free_port()), "--temp-dir", temp_dir, "--disable-usage-stats"]
    log = open(Path(temp_dir) / "head.log", "wb")  # noqa: SIM115 (closed after the head stops)
    head = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**_env_without_ray(),
                                                                            "RAY_USAGE_STATS_ENABLED": "0"})
    address = f"http://127.0.0.1:{dashboard}"
    try:
        def client():
            if head.poll() is not None:
                raise AssertionError(f"ray start exited {head.returncode}: "
                                     f"{(Path(temp_dir) / 'head.log').read_text()[-2000:]}")
            try:
                return ray_job_submission.JobSubmissionClient(address)
            except OSError:  # ConnectionError until the dashboard answers
                return None

        wait_for(client, 120, "the Ray dashboard's job API", interval_s=1.0)
        yield address
    finally:
        _stop_head(head, temp_dir)
        log.close()


def _env_without_ray() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}


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
    return {"platform": platform, "dataset": dataset, "ray_env": ray_env}


def test_ray_runs_a_tiny_train_job_and_cancels_a_running_one(ray_head, world):
    from medplatform.ray_runner import RayRunner, submission_id

    platform, dataset = world["platform"], world["dataset"]
    runner = RayRunner(ray_head, env=world["ray_env"], python=sys.executable)
    job = jobs.submit_job(platform, "train", dataset.id, "raytiny",
                          {"preset": "tiny", "phases": ["transunet"], "epochs": 1})
    assert runner.submit(platform, job.id) == submission_id(job.id)
    # Handed to Ray: a local worker's claim skips it.
    assert jobs.claim_next(platform, "local-worker", 1) is None
    wait_for(lambda: runner.ray_status(job.id) in ("SUCCEEDED", "FAILED", "STOPPED"), 240, "the Ray job to end")
    done = runner.sync(platform, job.id)
    assert runner.ray_status(job.id) == "SUCCEEDED", runner.logs(job.id)[-3000:]
    assert done.status == "succeeded", (done.error, runner.logs(job.id)[-3000:])
    assert done.worker_id.startswith(f"ray:{submission_id(job.id)}@")
    info = platform.registry.get_version("raytiny", 1)
    assert info.job_id == job.id and info.dataset_sha256 == dataset.sha256 and info.metrics["n_cases"] == 2
    assert "transunet epoch 1/1" in jobs.job_log(platform, job.id)

    long = jobs.submit_job(platform, "train", dataset.id, "raytiny",
                           {"preset": "tiny", "phases": ["transunet"], "epochs": 1000})
    runner.submit(platform, long.id)
    wait_for(lambda: (jobs.get_job(platform, long.id).progress or {}).get("epoch", 0) >= 1, 240,
             "the long Ray job to finish an epoch")
    runner.cancel(platform, long.id)
    wait_for(lambda: runner.ray_status(long.id) in ("SUCCEEDED", "FAILED", "STOPPED"), 60, "Ray to stop the job")
    ended = wait_for(lambda: (j := runner.sync(platform, long.id)).status in jobs.FINISHED and j, 30,
                     "the cancelled job's row to end")
    assert runner.ray_status(long.id) == "STOPPED"
    assert ended.status == "cancelled" and ended.error == "cancelled by request"
    assert [v.version for v in platform.registry.list_versions("raytiny")] == [1]
