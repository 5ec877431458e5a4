"""``bentoml serve service.app:MedRefine`` takes its address from MEDREFINE_HOST/MEDREFINE_PORT, loopback by
default, as ``python -m service`` does (not BentoML's 0.0.0.0:3000)."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys

import psutil


def _listening(pid: int) -> set[tuple[str, int]]:
    """Every TCP address the process ``pid`` and its children listen on."""
    found = set()
    parent = psutil.Process(pid)
    for proc in [parent, *parent.children(recursive=True)]:
        try:
            conns = proc.net_connections(kind="tcp")
        except psutil.NoSuchProcess:
            continue
        found.update((c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN)
    return found


def test_bentoml_serve_listens_on_medrefine_port_on_loopback_only(service_artifacts, tmp_path):
    from tests.support.service_fixtures import REPO_ROOT, ServerProcess, free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MEDREFINE_", "BENTOML_HOST", "BENTOML_PORT"))}
    env.update({
        "MEDREFINE_PORT": str(port),  # MEDREFINE_HOST unset: loopback is the default
        "MEDREFINE_GRPC_PORT": "0",
        "MEDREFINE_ARTIFACTS": str(service_artifacts.art_dir),
        "MEDREFINE_GENERATORS": "off",
        "MEDREFINE_INTRA_OP_THREADS": "1",
        "BENTOML_HOME": str(tmp_path / "bentoml"),
        "BENTOML_DO_NOT_TRACK": "True",
        "OMP_NUM_THREADS": "1",
    })
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "bentoml", "serve", "service.app:MedRefine",
                                    "--working-dir", str(REPO_ROOT)], cwd=tmp_path, env=env, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    server = ServerProcess(process, port, 0, service_artifacts.art_dir, log_path, None, env)
    try:
        server.wait_ready()  # GET http://127.0.0.1:<MEDREFINE_PORT>/readyz answers 200
        listening = _listening(process.pid)
    finally:
        server.stop(30)
    assert ("127.0.0.1", port) in listening, (listening, server.log()[-3000:])
    assert all(port_ != 3000 for _, port_ in listening), listening
    assert all(ipaddress.ip_address(ip).is_loopback for ip, _ in listening), listening
