"""A real medrefine server on loopback for service tests: process start/stop and HTTP helpers.

``tests/conftest.py``'s session fixture ``live_server`` starts one over ``service_artifacts`` with these;
tests that need a server with other settings call ``start_server`` themselves.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]
TEST_API_KEY = "test-key-0123456789"
API_KEY_ENV = "MEDREFINE_TEST_API_KEY"

__all__ = [
    "API_KEY_ENV",
    "TEST_API_KEY",
    "ServerProcess",
    "free_port",
    "start_server",
]


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServerProcess:
    """A started ``python -m service`` process."""

    process: subprocess.Popen
    port: int
    grpc_port: int
    art_dir: Path
    log_path: Path
    api_key: str | None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers(), timeout=kwargs.pop("timeout", 60.0), **kwargs)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        last = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()[-4000:]}")
            try:
                response = httpx.get(self.url + "/readyz", timeout=2.0)
                last = response.status_code
                if response.status_code == 200:
                    return
            except httpx.HTTPError as exc:
                last = repr(exc)
            time.sleep(0.25)
        raise RuntimeError(f"server not ready after {timeout_s:.0f} s (last: {last}):\n{self.log()[-4000:]}")

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM (the server drains) and wait; SIGKILL it and its workers if it does not exit in time."""
        if self.process.poll() is None:
            import psutil

            try:
                children = psutil.Process(self.process.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                children = []
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
            for child in children:  # BentoML workers run in their own sessions
                with contextlib.suppress(psutil.NoSuchProcess):
                    child.kill()
        return int(self.process.returncode)


def start_server(
    art_dir: Path,
    work_dir: Path,
    *,
    api_key: str | None = TEST_API_KEY,
    env: Mapping[str, str] | None = None,
    wait: bool = True,
    backend: str = "onnxruntime",
) -> ServerProcess:
    """Start ``python -m service`` on free loopback ports over ``art_dir`` on ``backend``; logs go to
    ``work_dir/server.log``."""
    work_dir.mkdir(parents=True, exist_ok=True)
    port, grpc_port = free_port(), free_port()
    while grpc_port == port:
        grpc_port = free_port()
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("MEDREFINE_")}
    child_env.update({
        "BENTOML_HOME": str(work_dir / "bentoml"),
        "BENTOML_DO_NOT_TRACK": "True",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        "MEDREFINE_INTRA_OP_THREADS": "1",
        "MEDREFINE_DRAIN_TIMEOUT_S": "20",
        "MEDREFINE_DATA_DIR": str(work_dir / "var"),  # each server its own registry: default v1 = its artifacts
    })
    if api_key:
        child_env[API_KEY_ENV] = api_key
    child_env.update(env or {})
    command = [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port),
               "--grpc-port", str(grpc_port), "--artifacts", str(art_dir), "--backend", backend,
               "--api-key-env", API_KEY_ENV]
    log_path = work_dir / "server.log"
    log = open(log_path, "wb")  # the child process keeps writing to it
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=child_env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    log.close()
    server = ServerProcess(process, port, grpc_port, Path(art_dir), log_path, api_key, child_env)
    if wait:
        try:
            server.wait_ready()
        except Exception:
            server.stop(10)
            raise
    return server
