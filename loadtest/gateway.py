"""Run deploy/gateway/nginx.conf on loopback in front of medrefine replicas (tests and loadtest.scaleout)."""

from __future__ import annotations

import hashlib
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["CONFIG", "DIGEST_HEADER", "POLICIES", "Gateway", "image_digest", "install_nginx"]

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG = REPO_ROOT / "deploy" / "gateway" / "nginx.conf"
DIGEST_HEADER = "X-Medrefine-Image"
POLICIES = ("hash", "round_robin")
_LISTEN = "listen 127.0.0.1:8080;"
_HASH = "hash $medrefine_route consistent;"


def image_digest(upload: bytes) -> str:
    """The routing key a client sends: sha256 hex of the uploaded file's bytes (the replica's cache key)."""
    return hashlib.sha256(upload).hexdigest()


def install_nginx() -> str:
    """Path of ``nginx``, installing Debian's ``nginx-light`` first when it is missing (root or sudo).

    Raises:
        RuntimeError: naming the apt-get command that failed.
    """
    found = shutil.which("nginx") or (Path("/usr/sbin/nginx").exists() and "/usr/sbin/nginx")
    if found:
        return str(found)
    import os

    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "nginx-light"]):
        result = subprocess.run(sudo + command, capture_output=True, text=True, timeout=600,
                                env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr[-2000:]}")
    return shutil.which("nginx") or "/usr/sbin/nginx"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Gateway:
    """nginx with ``deploy/gateway/nginx.conf`` on ``127.0.0.1:<port>`` over ``replicas`` (host:port).

    Args:
        replicas: the replicas' HTTP addresses, e.g. ``["127.0.0.1:3000"]`` (at least one).
        work: a directory for the prefix (config copy, replicas.conf, temp files, pid).
        policy: ``"hash"`` (the committed file) or ``"round_robin"``.

    Raises:
        ValueError: an unknown policy or no replicas.
    """

    def __init__(self, replicas: Sequence[str], work: Path, *, policy: str = "hash") -> None:
        if policy not in POLICIES:
            raise ValueError(f"Gateway policy: expected one of {POLICIES}, got {policy!r}")
        if not replicas:
            raise ValueError("Gateway replicas: expected at least one host:port")
        self.port = _free_port()
        self.work = Path(work)
        text = CONFIG.read_text()
        for needle in (_LISTEN, _HASH):  # the config must still hold the lines this class rewrites
            if needle not in text:
                raise ValueError(f"{CONFIG}: expected the line {needle!r}")
        text = text.replace(_LISTEN, f"listen 127.0.0.1:{self.port};")
        if policy == "round_robin":
            text = text.replace(_HASH, "")
        (self.work / "tmp").mkdir(parents=True, exist_ok=True)
        (self.work / "nginx.conf").write_text(text)
        (self.work / "replicas.conf").write_text("".join(f"server {r};\n" for r in replicas))
        self.log_path = self.work / "nginx.log"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30.0) -> Gateway:
        nginx = install_nginx()
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [nginx, "-p", str(self.work), "-c", str(self.work / "nginx.conf"), "-g", "daemon off;"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nginx exited {self.process.returncode}: {self.log_path.read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"nginx not listening on {self.port} after {timeout_s} s")

    def stop(self) -> None:
        """SIGQUIT (graceful), then SIGKILL after 10 s."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGQUIT)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)

    def __enter__(self) -> Gateway:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
