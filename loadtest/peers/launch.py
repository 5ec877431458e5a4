"""Start a peer server on 127.0.0.1 for the benchmark: which command, which environment, which URLs."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from loadtest.system import ServerProcess, free_port

__all__ = ["PEERS", "PEER_MAX_BATCH_SIZE", "PeerLaunch", "launch_peer"]

PEERS: dict[str, tuple[str, ...]] = {
    "bentoml-idiomatic": ("rest",),
    "kserve": ("oip-http", "grpc"),
}


# The API service's keep-alive, as ours (75 s). Under overload BentoML's API service still gets
# ServerDisconnectedError from its model service (answered 500): `--timeout-keep-alive` is not passed on to
# dependency services, which keep uvicorn's 5 s while the calling aiohttp pool keeps connections 15 s.
BENTOML_KEEP_ALIVE_S = 75

# BentoML's batch limit as its documentation writes the batchable API (our own default is ServiceSettings').
PEER_MAX_BATCH_SIZE = 16


@dataclass
class PeerLaunch:
    """A peer ready to start: ``server`` (a context manager) and the URL of each protocol it serves."""

    name: str
    server: ServerProcess
    urls: dict[str, str]
    details: dict[str, str]


def launch_peer(name: str, art_dir: str | Path, *, threads: int, max_batch_size: int, work: Path,
                thread_env: dict[str, str], startup_timeout_s: float = 300.0,
                log: Callable[[str], None] | None = None) -> PeerLaunch:
    """The (not yet started) server of peer ``name`` over ``art_dir``.

    Raises:
        ValueError: ``name`` is not in :data:`PEERS`.
        RuntimeError: the KServe venv could not be created.
    """
    art_dir = str(Path(art_dir).resolve())
    if name == "bentoml-idiomatic":
        port = free_port()
        env = {**thread_env, "BENTOML_HOME": str(work / f"{name}-bentoml-home"),
               "MEDREFINE_PEER_ARTIFACTS": art_dir, "MEDREFINE_PEER_THREADS": str(threads),
               "MEDREFINE_PEER_MAX_BATCH_SIZE": str(max_batch_size)}
        argv = [sys.executable, "-m", "bentoml", "serve", "loadtest.peers.bentoml_idiomatic:Segmenter",
                "--host", "127.0.0.1", "--port", str(port), "--timeout-keep-alive", str(BENTOML_KEEP_ALIVE_S)]
        server = ServerProcess(argv, ready_url=f"http://127.0.0.1:{port}/readyz", env=env,
                               log_path=work / f"{name}.log", startup_timeout_s=startup_timeout_s, name=name)
        return PeerLaunch(name, server, {"rest": f"http://127.0.0.1:{port}"},
                          {"max_batch_size": str(max_batch_size), "max_latency_ms": "BentoML default (60000)",
                           "workers": "1 per service (API service + batching model service)",
                           "timeout_keep_alive_s": str(BENTOML_KEEP_ALIVE_S)})
    if name == "kserve":
        from loadtest.peers.kserve_venv import KSERVE_VERSION, ensure_kserve_venv, peer_env

        python = ensure_kserve_venv(log=log)
        port, grpc_port = free_port(), free_port()
        argv = [str(python), "-m", "loadtest.peers.kserve_model", "--artifacts", art_dir, "--threads", str(threads),
                "--model_name", "segment", "--http_port", str(port), "--grpc_port", str(grpc_port)]
        server = ServerProcess(argv, ready_url=f"http://127.0.0.1:{port}/v2/models/segment/ready",
                               env={**thread_env, **peer_env()}, log_path=work / f"{name}.log",
                               startup_timeout_s=startup_timeout_s, name=name)
        return PeerLaunch(name, server, {"oip-http": f"http://127.0.0.1:{port}", "grpc": f"127.0.0.1:{grpc_port}"},
                          {"kserve": KSERVE_VERSION, "python": str(python),
                           "settings": "ModelServer defaults: 1 worker, latency logging on, synchronous predict"})
    raise ValueError(f"peer {name!r} unknown; choose from {sorted(PEERS)}")
