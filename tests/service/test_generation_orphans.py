"""Orphaned generation work (issue #15, item 5): a /generate whose request timed out, or whose client left,
leaves the shared denoising loop, so the next request does not wait behind work nobody will read.

A server of its own gets six concurrent /generate at the documented maximum (100 steps x 16 images, about
a minute of denoising in one loop on a CPU) that all end early: answered 504 by the server
(``MEDREFINE_REQUEST_TIMEOUT_S=6``), or abandoned by their clients after 3 s (the server's timeout is 120 s).
A small /generate sent afterwards must answer 200, and ``medrefine_generation_steps_total`` (denoising
steps run, summed over requests) must show that once the six had ended only a few more steps ran besides
the small request's own: before the fix the loop ran the rest of its 100 steps for nobody (and the small
request, queued behind it, timed out). No timing is asserted beyond generous client timeouts; the six
``outcomes`` check that the orphaned work did outlast its requests (it would not on a much faster machine).
"""

from __future__ import annotations

import re
import threading

import httpx
import pytest

pytestmark = pytest.mark.timeout(300)

BIG = {"prompt": "chest x-ray, left lower lobe nodule", "modality": "chest_xray", "steps": 100, "num_images": 16,
       "seed": 1}
SMALL = {"prompt": "brain mri", "modality": "brain_mri", "steps": 2, "num_images": 1, "seed": 2}
CONCURRENT = 6


def _counter(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})?\s+(\S+)$", text, re.MULTILINE))


def _orphan_then_small(server, client_timeout_s: float) -> tuple[list[object], httpx.Response, float, float]:
    """Six big /generate (each ends by ``client_timeout_s`` or the server's timeout), then a small one;
    the step counter once the six have ended, and after the small one."""
    outcomes: list[object] = []
    lock = threading.Lock()

    def big() -> None:
        try:
            with server.client(timeout=client_timeout_s) as client:
                outcome: object = client.post("/generate", json=BIG).status_code
        except httpx.TimeoutException:
            outcome = "client left"
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=big, daemon=True) for _ in range(CONCURRENT)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    ended = _counter(server.url, "medrefine_generation_steps_total")
    with server.client(timeout=30) as client:  # the orphaned loop would need about a minute more
        small = client.post("/generate", json=SMALL)
    return outcomes, small, ended, _counter(server.url, "medrefine_generation_steps_total")


@pytest.mark.parametrize(
    ("server_timeout_s", "client_timeout_s", "ended_by"),
    [("6", 120.0, 504), ("120", 3.0, "client left")],
    ids=["request_timeout", "client_disconnect"],
)
def test_abandoned_generate_leaves_the_loop(service_artifacts, generator_artifacts, tmp_path, server_timeout_s,
                                            client_timeout_s, ended_by):
    from tests.support.service_fixtures import start_server

    server = start_server(service_artifacts.art_dir, tmp_path / "orphans",
                          env={"MEDREFINE_GENERATORS": str(generator_artifacts),
                               "MEDREFINE_REQUEST_TIMEOUT_S": server_timeout_s})
    try:
        outcomes, small, ended, steps = _orphan_then_small(server, client_timeout_s)
    finally:
        server.stop(30)

    assert outcomes == [ended_by] * CONCURRENT, outcomes
    assert small.status_code == 200, small.text
    assert len(small.json()["images_png_base64"]) == 1
    # The six ran steps while they were wanted; after they ended, at most the step then under way (one per
    # request in it) ran besides the small request's own, not the rest of their 100.
    assert ended > 0 and SMALL["steps"] <= steps - ended <= SMALL["steps"] + 2 * CONCURRENT, (ended, steps)
