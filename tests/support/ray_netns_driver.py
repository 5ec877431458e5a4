"""The Ray side of tests/medplatform/test_platform_ray.py, run inside a private network namespace
(``unshare --net``): start a head, hand jobs to it through the real ``JobSubmissionClient``, stop it, and report
JSON lines on stdout."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import psutil

MARK = "RAYNETNS "  # prefix of the lines meant for the test; anything else on stdout is ignored
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")


def bring_loopback_up() -> None:
    """``ip link set lo up`` without iproute2: a fresh network namespace starts with ``lo`` down."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        flags = struct.unpack("16sh22x", fcntl.ioctl(s, SIOCGIFFLAGS, struct.pack("16sh22x", b"lo", 0)))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sh22x", b"lo", flags | IFF_UP))


def check_private_namespace(host_netns: str) -> list[str]:
    """The interface names here; raises unless this is a network namespace other than ``host_netns`` with
    only ``lo``, so Ray is never started where something outside could reach it."""
    here = os.readlink("/proc/self/ns/net")
    names = [name for _, name in socket.if_nameindex()]
    if here == host_netns or names != ["lo"]:
        raise RuntimeError(f"not in a private loopback-only network namespace: netns {here} (host {host_netns}), "
                           f"interfaces {names}; run under `unshare --net` as root")
    return names


def bound_sockets() -> list[dict[str, Any]]:
    """Every listening TCP / bound UDP socket in this namespace (the namespace is new: they are all Ray's)."""
    out = []
    for conn in psutil.net_connections(kind="inet"):
        if conn.status == psutil.CONN_LISTEN or (conn.type == socket.SOCK_DGRAM and not conn.raddr):
            try:
                name = psutil.Process(conn.pid).name() if conn.pid else "?"
            except psutil.NoSuchProcess:
                name = "?"
            out.append({"ip": conn.laddr.ip, "port": conn.laddr.port, "pid": conn.pid, "name": name,
                        "type": "tcp" if conn.type == socket.SOCK_STREAM else "udp"})
    return out


def processes_using(temp_dir: str) -> list[psutil.Process]:
    """Ray's processes of this head: each has its temp dir in its command line."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in part for part in proc.info["cmdline"] or ()):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def stop_head(head: subprocess.Popen | None, temp_dir: str, grace_s: float = 30) -> None:
    """End the blocking ``ray start`` and every Ray process still using ``temp_dir`` (ours, so by pid)."""
    if head is not None:
        head.terminate()
        try:
            head.wait(grace_s)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
    deadline = time.monotonic() + grace_s
    while (left := processes_using(temp_dir)) and time.monotonic() < deadline:
        time.sleep(0.5)
    for proc in left:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    shutil.rmtree(temp_dir, ignore_errors=True)


def report(event: str, **payload: Any) -> None:
    print(MARK + json.dumps({"event": event, **payload}), flush=True)


def pause(stage: str, **payload: Any) -> None:
    """Report ``stage`` and wait for the test's ``go`` (it checks the host's side while Ray runs)."""
    report(stage, **payload)
    if sys.stdin.readline().strip() != "go":
        raise RuntimeError(f"the test did not answer 'go' after {stage}")


def start_head(cfg: dict[str, Any]) -> tuple[subprocess.Popen, str]:
    """A one-CPU head (``ray start --block``) with the job API at the returned address."""
    from ray.job_submission import JobSubmissionClient

    from tests.support.platform_jobs_fixtures import wait_for

    temp_dir, ports = cfg["temp_dir"], cfg["ports"]
    cmd = [cfg["ray"], "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--num-cpus", "1",
           "--port", str(ports["gcs"]), "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
           "--dashboard-port", str(ports["dashboard"]), "--ray-client-server-port", str(ports["client"]),
           "--dashboard-agent-listen-port", str(ports["agent"]), "--temp-dir", temp_dir, "--disable-usage-stats"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    with open(Path(temp_dir) / "head.log", "wb") as log:
        head = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**env, "RAY_USAGE_STATS_ENABLED": "0"})
    address = f"http://127.0.0.1:{ports['dashboard']}"

    def client():
        if head.poll() is not None:
            raise RuntimeError(f"ray start exited {head.returncode}: "
                               f"{(Path(temp_dir) / 'head.log').read_text()[-2000:]}")
        try:
            return JobSubmissionClient(address)
        except OSError:  # ConnectionError until the dashboard answers
            return None

    wait_for(client, 120, "the Ray dashboard's job API", interval_s=1.0)
    return head, address


def run_scenario(address: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """A tiny train job run by Ray, then a long one cancelled while it trains; what Ray and the rows said."""
    from medplatform import jobs
    from medplatform.ray_runner import RayRunner
    from tests.support.platform_jobs_fixtures import open_test_platform, wait_for

    platform = open_test_platform(dict(os.environ))
    runner = RayRunner(address, env=cfg["ray_env"], python=sys.executable)
    ended = ("SUCCEEDED", "FAILED", "STOPPED")

    tiny = jobs.submit_job(platform, "train", cfg["dataset_id"], "raytiny",
                           {"preset": "tiny", "phases": ["transunet"], "epochs": 1})
    tiny_submission = runner.submit(platform, tiny.id)
    local_claim = jobs.claim_next(platform, "local-worker", 1)  # handed to Ray: a local worker skips it
    wait_for(lambda: runner.ray_status(tiny.id) in ended, 240, "the Ray job to end")
    tiny_row = runner.sync(platform, tiny.id)
    tiny_result = {"id": tiny.id, "submission": tiny_submission, "ray_status": runner.ray_status(tiny.id),
                   "status": tiny_row.status, "error": tiny_row.error, "worker_id": tiny_row.worker_id,
                   "local_claim": None if local_claim is None else local_claim.id,
                   "ray_logs": runner.logs(tiny.id)[-3000:]}

    long = jobs.submit_job(platform, "train", cfg["dataset_id"], "raytiny",
                           {"preset": "tiny", "phases": ["transunet"], "epochs": 1000})
    runner.submit(platform, long.id)
    wait_for(lambda: (jobs.get_job(platform, long.id).progress or {}).get("epoch", 0) >= 1, 240,
             "the long Ray job to finish an epoch")
    runner.cancel(platform, long.id)
    wait_for(lambda: runner.ray_status(long.id) in ended, 60, "Ray to stop the job")
    long_row = wait_for(lambda: (j := runner.sync(platform, long.id)).status in jobs.FINISHED and j, 30,
                        "the cancelled job's row to end")
    long_result = {"id": long.id, "ray_status": runner.ray_status(long.id), "status": long_row.status,
                   "error": long_row.error, "ray_logs": runner.logs(long.id)[-3000:]}
    return {"tiny": tiny_result, "long": long_result}


def main() -> None:
    """$RAYNETNS_CFG: JSON with host_netns, temp_dir, ray, ports, dataset_id, ray_env (see the test); not in argv,
    where ``processes_using(temp_dir)`` would take this process for one of Ray's."""
    cfg = json.loads(os.environ.pop("RAYNETNS_CFG"))
    head = None
    try:
        interfaces = check_private_namespace(cfg["host_netns"])  # first: never touch the host's lo
        bring_loopback_up()
        head, address = start_head(cfg)
        pause("ready", interfaces=interfaces, netns=os.readlink("/proc/self/ns/net"), sockets=bound_sockets())
        result = run_scenario(address, cfg)
        pause("ran", sockets=bound_sockets())
        stop_head(head, cfg["temp_dir"])
        head = None
        report("done", **result)
    except BaseException:
        report("error", traceback=traceback.format_exc()[-4000:])
        raise
    finally:
        if head is not None:
            stop_head(head, cfg["temp_dir"])


if __name__ == "__main__":
    main()
