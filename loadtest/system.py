"""Processes and the machine: start/stop servers under test, CPU and RSS accounting, machine description."""

from __future__ import annotations

import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil

from core.machine import cpu_model

__all__ = [
    "CpuAccount",
    "ServerProcess",
    "free_port",
    "git_sha",
    "machine_description",
    "machine_slug",
    "process_tree_rss",
]

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def process_tree_rss(pid: int) -> dict[str, Any]:
    """``{"total_bytes", "by_pid": {pid: {"rss_bytes", "cmd"}}}`` for ``pid`` and its descendants."""
    by_pid: dict[int, dict[str, Any]] = {}
    for proc in _tree(pid):
        try:
            with proc.oneshot():
                by_pid[proc.pid] = {"rss_bytes": proc.memory_info().rss, "cmd": " ".join(proc.cmdline()[:4])[:120]}
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return {"total_bytes": sum(v["rss_bytes"] for v in by_pid.values()), "by_pid": by_pid}


class ServerProcess:
    """A server under test in its own process group (a context manager).

    Args:
        argv: the command.
        ready_url: a loopback URL that answers 200 once the server can take requests.
        env: extra environment variables (over this process's environment).
        log_path: stdout and stderr of the server go here.
        startup_timeout_s: give up (and stop the server) when not ready after this long.
        name: how errors call the server.

    Raises (from :meth:`start`):
        RuntimeError: the server exited or was not ready in time; the message ends with its log tail.
    """

    def __init__(self, argv: Sequence[str], *, ready_url: str, env: Mapping[str, str] | None = None,
                 log_path: str | Path, startup_timeout_s: float = 300.0, name: str = "server") -> None:
        self.argv = list(argv)
        self.ready_url = ready_url
        self.env = {**os.environ, **(env or {})}
        self.log_path = Path(log_path)
        self.startup_timeout_s = startup_timeout_s
        self.name = name
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_s: float | None = None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError(f"{self.name} is not started")
        return self.proc.pid

    def start(self) -> ServerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self._log = log
        started = time.perf_counter()
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                     cwd=REPO_ROOT, start_new_session=True)
        deadline = started + self.startup_timeout_s
        with httpx.Client(timeout=5.0) as client:
            while True:
                if self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"{self.name} exited with code {self.proc.returncode} during start-up "
                                       f"({' '.join(self.argv)}); log tail:\n{self.log_tail()}")
                try:
                    if client.get(self.ready_url).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.perf_counter() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"{self.name} not ready at {self.ready_url} after {self.startup_timeout_s:.0f} s; "
                        f"log tail:\n{self.log_tail()}"
                    )
                time.sleep(0.25)
        self.startup_s = time.perf_counter() - started
        return self

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, grace_s: float = 30.0) -> int | None:
        """SIGTERM the server's process group, SIGKILL it after ``grace_s``; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(10)
        else:  # the leader is gone; stragglers in its group (workers) must not outlive the test
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        log = getattr(self, "_log", None)
        if log is not None and not log.closed:
            log.close()
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass(frozen=True)
class _CpuSnapshot:
    at: float
    machine_busy_s: float
    server_s: dict[int, float]
    loader_s: float


class CpuAccount:
    """CPU seconds of the server tree, this process and the rest of the machine between two snapshots."""

    def __init__(self, server_pid: int | None) -> None:
        self.server_pid = server_pid
        self._me = psutil.Process()

    def snapshot(self) -> _CpuSnapshot:
        times = psutil.cpu_times()
        busy = sum(times) - times.idle - getattr(times, "iowait", 0.0)
        server: dict[int, float] = {}
        if self.server_pid is not None:
            for proc in _tree(self.server_pid):
                try:
                    t = proc.cpu_times()
                    server[proc.pid] = t.user + t.system
                except psutil.NoSuchProcess:
                    continue
        own = self._me.cpu_times()
        return _CpuSnapshot(time.perf_counter(), busy, server, own.user + own.system)

    @staticmethod
    def delta(before: _CpuSnapshot, after: _CpuSnapshot) -> dict[str, float]:
        """Average cores used over the interval: ``{"server", "loader", "other", "machine", "cores"}``."""
        wall = max(after.at - before.at, 1e-9)
        server = sum(v - before.server_s.get(pid, 0.0) for pid, v in after.server_s.items())
        loader = after.loader_s - before.loader_s
        machine = after.machine_busy_s - before.machine_busy_s
        return {
            "server_cores": server / wall,
            "loader_cores": loader / wall,
            "other_cores": max(0.0, machine - server - loader) / wall,
            "machine_cores": machine / wall,
            "cores": float(psutil.cpu_count() or 1),
        }


def git_sha() -> str:
    """``<sha>`` of HEAD, with ``+dirty`` when the tree has changes; ``"unknown"`` outside git."""
    git = shutil.which("git")
    if git is None:
        return "unknown"
    try:
        sha = subprocess.run([git, "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run([git, "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (subprocess.SubprocessError, OSError):
        return "unknown"
    return sha + ("+dirty" if dirty else "")


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # not installed
        return None


def machine_description() -> dict[str, Any]:
    """CPU model, cores, RAM, OS, library versions, git sha and the current load average."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (None, None, None)
    return {
        "cpu_model": cpu_model(),
        "logical_cores": psutil.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "affinity_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "ram_bytes": psutil.virtual_memory().total,
        "os": platform.platform(),
        "hostname": platform.node(),
        "python": sys.version.split()[0],
        "torch": _version("torch"),
        "onnxruntime": _version("onnxruntime"),
        "bentoml": _version("bentoml"),
        "numpy": _version("numpy"),
        "git_sha": git_sha(),
        "loadavg_1_5_15": list(load),
    }


def machine_slug(description: Mapping[str, Any]) -> str:
    """A file-name-safe machine name, e.g. ``intel-xeon-processor-2c``."""
    model = str(description.get("cpu_model", "cpu")).lower()
    for noise in ("(r)", "(tm)", "cpu", "@"):
        model = model.replace(noise, " ")
    words = [w for w in "".join(c if c.isalnum() or c == "." else " " for c in model).split() if w]
    return "-".join(words[:4] + [f"{description.get('logical_cores', 0)}c"])
