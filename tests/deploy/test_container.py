"""The container image, built from nothing by ``make image`` and run as deployed (issue #18).

Read-only, non-root, with an API key, ports on 127.0.0.1 only; masks over REST and gRPC equal the
offline pipeline's on the same artifacts, pixel for pixel; ``podman stop`` drains and exits 0 inside the drain deadline.
"""

from __future__ import annotations

import base64
import io
import json
import os
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from PIL import Image

from core.imageio import decode_image, encode_png, to_uint8
from inference.pipeline import SegmentationPipeline
from tests.support.artifact_factory import phantom_images
from tests.support.service_fixtures import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
TAG = "localhost/medrefine:test"
# build.sh writes the engine settings (runc, cgroupfs, ulimits) here; `podman run` needs the same.
WORKDIR = Path(os.environ.get("MEDREFINE_IMAGE_WORKDIR", "/var/tmp/medrefine-image"))
BUILD_TIMEOUT_S = 40 * 60  # cold: ~2 min base image + ~4-6 min Dockerfile on 2 busy cores
READY_TIMEOUT_S = 300
DRAIN_TIMEOUT_S = 20.0  # MEDREFINE_DRAIN_TIMEOUT_S inside the container

pytestmark = pytest.mark.timeout(BUILD_TIMEOUT_S + 15 * 60)


def _as_root(command: list[str]) -> list[str]:
    """Rootful Podman: run as is when root, else through non-interactive sudo (which fails loudly)."""
    if os.geteuid() == 0:
        return command
    return ["sudo", "-n", "env", f"CONTAINERS_CONF={WORKDIR / 'containers.conf'}", *command]


def podman(*args: str, timeout: float = 120.0, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "CONTAINERS_CONF": str(WORKDIR / "containers.conf")}
    result = subprocess.run(_as_root(["podman", *args]), env=env, capture_output=True, text=True,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} exited {result.returncode}:\n{result.stderr[-4000:]}")
    return result


@pytest.fixture(scope="module")
def image() -> str:
    """``make image`` (export if needed, then deploy/container/build.sh; installs podman when missing).

    ``-o .venv/.installed``: ``make test`` has just installed the venv; never reinstall it mid-suite.
    """
    started = time.monotonic()
    command = _as_root(["make", "-o", ".venv/.installed", "image", f"IMAGE_TAG={TAG}"])
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    assert result.returncode == 0, f"make image failed ({result.returncode}):\n{result.stdout[-3000:]}\n" \
                                   f"{result.stderr[-5000:]}"
    steps = [line for line in result.stdout.splitlines() + result.stderr.splitlines() if line.startswith("build.sh:")]
    print(f"make image: {time.monotonic() - started:.0f} s; " + "; ".join(steps), file=sys.stderr)
    return TAG


class Container:
    """One `podman run -d` of the image with its published loopback ports and API key."""

    def __init__(self, tag: str) -> None:
        self.name = f"medrefine-test-{secrets.token_hex(4)}"
        self.key = secrets.token_hex(16)
        self.http_port, self.grpc_port = free_port(), free_port()
        self.tag = tag

    def start(self) -> None:
        podman("run", "-d", "--init", "--read-only", "--tmpfs", "/tmp", "--name", self.name,
               "-e", f"MEDREFINE_API_KEY={self.key}", "-e", f"MEDREFINE_DRAIN_TIMEOUT_S={DRAIN_TIMEOUT_S}",
               "-p", f"127.0.0.1:{self.http_port}:3000", "-p", f"127.0.0.1:{self.grpc_port}:8001", self.tag)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def inspect(self) -> dict:
        return json.loads(podman("inspect", self.name).stdout)[0]

    def logs(self) -> str:
        result = podman("logs", self.name, check=False)
        return (result.stdout + result.stderr)[-4000:]

    def wait_ready(self) -> float:
        started = time.monotonic()
        last = None
        while time.monotonic() - started < READY_TIMEOUT_S:
            if not self.inspect()["State"]["Running"]:
                raise AssertionError(f"container exited:\n{self.logs()}")
            try:
                last = httpx.get(self.url + "/readyz", timeout=3.0).status_code
                if last == 200:
                    return time.monotonic() - started
            except httpx.HTTPError as exc:
                last = repr(exc)
            time.sleep(0.5)
        raise AssertionError(f"not ready after {READY_TIMEOUT_S} s (last: {last}):\n{self.logs()}")

    def remove(self) -> None:
        podman("rm", "-f", "-t", "0", self.name, check=False)


@pytest.fixture(scope="module")
def container(image):
    box = Container(image)
    try:
        box.start()
        box.wait_ready()
        yield box
    finally:
        box.remove()


@pytest.fixture(scope="module")
def pipeline(container, tmp_path_factory) -> SegmentationPipeline:
    """The offline pipeline over the artifacts inside the image (copied out; loading verifies their hashes)."""
    out = tmp_path_factory.mktemp("image_models")
    podman("cp", f"{container.name}:/models/default", str(out))
    return SegmentationPipeline.from_artifacts(out / "default", "onnxruntime", intra_op_threads=1)


@pytest.fixture(scope="module")
def phantom_u8() -> np.ndarray:
    """A 192 x 224 breast-ultrasound phantom, uint8 gray."""
    return to_uint8(phantom_images([(192, 224)], seed=11)[0])


def offline(pipeline: SegmentationPipeline, pixels: np.ndarray):
    """The offline result as the server computes it: torch on one thread, as in the service's worker.

    With torch on this machine's default thread count, a reduction sums in another order and moved a
    box corner by 1e-5 px, flipping 8 boundary pixels of the 43,008 in this phantom.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        (expected,) = pipeline.segment([pixels])
    finally:
        torch.set_num_threads(threads)
    assert expected.mask.any(), "the phantom should give a non-empty mask, or the comparison proves little"
    return expected


def test_runs_read_only_as_non_root(container):
    state = container.inspect()
    assert state["HostConfig"]["ReadonlyRootfs"] is True
    assert podman("exec", container.name, "id", "-u").stdout.strip() == "10001"
    denied = podman("exec", container.name, "touch", "/opt/venv/x", check=False)
    assert denied.returncode != 0 and "Read-only file system" in denied.stderr
    bindings = state["HostConfig"]["PortBindings"]
    assert {b["HostIp"] for port in ("3000/tcp", "8001/tcp") for b in bindings[port]} == {"127.0.0.1"}


def test_readyz_and_health_check_pass(container):
    assert httpx.get(container.url + "/readyz", timeout=10).status_code == 200
    health = podman("healthcheck", "run", container.name, check=False, timeout=60)
    assert health.returncode == 0, health.stdout + health.stderr


def test_rest_needs_the_key(container, phantom_u8):
    files = {"file": ("p.png", encode_png(phantom_u8), "image/png")}
    response = httpx.post(container.url + "/segment", files=files, timeout=60)
    assert response.status_code == 401


def test_rest_segment_equals_offline_pipeline(container, pipeline, phantom_u8):
    png = encode_png(phantom_u8)
    response = httpx.post(container.url + "/segment", files={"file": ("p.png", png, "image/png")},
                          headers=container.headers(), timeout=120)
    assert response.status_code == 200, response.text
    body = response.json()
    # The image carries the exported model but not its training run, so the registry cannot hold it: it is
    # served as the start-up artifacts, named by their hash.
    assert body["model"]["version"] == pipeline.version
    served = np.array(Image.open(io.BytesIO(base64.b64decode(body["mask_png_base64"]))))
    expected = offline(pipeline, decode_image(png).pixels)
    np.testing.assert_array_equal(served, expected.mask * 255)  # pixel-exact
    np.testing.assert_allclose(body["box"], expected.box, atol=1e-5)


def test_the_platform_runs_in_the_image(container, tmp_path):
    """medplatform is in the image and works on its read-only filesystem (data under the /tmp tmpfs): a phantom
    dataset uploaded as a ZIP is validated and stored."""
    from tests.support.platform_fixtures import folder_members, phantom_folder, zip_bytes

    archive = zip_bytes(folder_members(phantom_folder(tmp_path / "phantoms", n=4)))
    uploaded = httpx.post(container.url + "/datasets", files={"file": ("phantoms.zip", archive, "application/zip")},
                          data={"name": "phantoms"}, headers=container.headers(), timeout=120)
    assert uploaded.status_code == 201, uploaded.text
    assert uploaded.json()["status"] == "ready"
    listed = httpx.get(container.url + "/datasets", headers=container.headers(), timeout=60)
    assert [d["id"] for d in listed.json()] == [uploaded.json()["id"]]


def test_grpc_segment_equals_offline_pipeline(container, pipeline, phantom_u8):
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{container.grpc_port}")
    metadata = (("authorization", f"Bearer {container.key}"),)
    tensor = grpcclient.InferInput("IMAGE", list(phantom_u8.shape), "UINT8")
    tensor.set_data_from_numpy(phantom_u8)
    result = client.infer("segment", [tensor], headers=dict(metadata), client_timeout=120)
    expected = offline(pipeline, phantom_u8.astype(np.float32) / 255.0)
    np.testing.assert_array_equal(result.as_numpy("MASK"), expected.mask)  # pixel-exact
    np.testing.assert_allclose(result.as_numpy("PROBABILITY"), expected.probability, atol=1e-6)


def test_sigterm_drains_in_flight_requests_and_exits_zero(container, phantom_u8):
    """Last: it stops the container. Requests accepted before SIGTERM are answered, then exit code 0."""
    png = encode_png(phantom_u8)
    statuses: list[int | str] = []

    def send() -> None:
        try:
            statuses.append(httpx.post(container.url + "/segment", files={"file": ("p.png", png, "image/png")},
                                       headers=container.headers(), timeout=120).status_code)
        except httpx.HTTPError as exc:
            statuses.append(repr(exc))

    senders = [threading.Thread(target=send) for _ in range(4)]
    for sender in senders:
        sender.start()
    time.sleep(0.5)  # the bodies (60 KB) are in; the requests hold concurrency slots
    started = time.monotonic()
    podman("stop", "-t", str(int(DRAIN_TIMEOUT_S) + 60), container.name, timeout=DRAIN_TIMEOUT_S + 120)
    stopped_s = time.monotonic() - started
    for sender in senders:
        sender.join(120)
    state = container.inspect()["State"]
    assert state["ExitCode"] == 0, container.logs()
    assert stopped_s < DRAIN_TIMEOUT_S, f"stopped after {stopped_s:.1f} s"
    assert statuses == [200] * 4, statuses



def test_every_pip_install_in_the_dockerfile_fails_the_build_at_once():
    """`pip install a && pip install b;` under `set -e` goes on after a failed `a` (only the last command of
    an AND list stops the shell): each install must be a command of its own."""
    text = (REPO_ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    runs = [line for line in text.splitlines() if line.startswith("RUN ")]
    installs = [run for run in runs if "pip install" in run]
    for run in installs:
        assert "set -e" in run, run
        for command in run.split(";"):
            assert not ("pip " in command and "&&" in command), f"pip chained with &&: {command.strip()}"
    assert len(installs) >= 3  # torch, the dependencies, the code
