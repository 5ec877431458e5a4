"""Orphaned generation work (issue #15, item 5): a /generate whose request timed out leaves the shared
denoising loop, so the next request does not wait behind work nobody will read.

A server of its own with ``MEDREFINE_REQUEST_TIMEOUT_S=6`` gets six concurrent /generate at the documented
maximum (100 steps x 16 images, about a minute of denoising in one loop on a CPU). All six answer 504;
a small /generate sent afterwards must answer 200 (before the fix it queued behind the rest of the loop
and timed out too), and ``medrefine_generation_steps_total`` (denoising steps run, summed over requests)
shows that the six stopped long before their 6 x 100 steps.
"""

from __future__ import annotations

import re
import threading

import httpx
import pytest

pytest_plugins = ["service_fixtures"]
pytestmark = pytest.mark.timeout(300)

BIG = {"prompt": "chest x-ray, left lower lobe nodule", "modality": "chest_xray", "steps": 100, "num_images": 16,
       "seed": 1}
SMALL = {"prompt": "brain mri", "modality": "brain_mri", "steps": 2, "num_images": 1, "seed": 2}
CONCURRENT = 6


def _counter(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})?\s+(\S+)$", text, re.MULTILINE))


def test_a_timed_out_generate_leaves_the_loop(service_artifacts, generator_artifacts, tmp_path):
    from service_fixtures import start_server

    server = start_server(service_artifacts.art_dir, tmp_path / "orphans",
                          env={"MEDREFINE_GENERATORS": str(generator_artifacts), "MEDREFINE_REQUEST_TIMEOUT_S": "6"})
    statuses: list[int] = []
    lock = threading.Lock()

    def big() -> None:
        with server.client(timeout=120) as client:
            response = client.post("/generate", json=BIG)
        with lock:
            statuses.append(response.status_code)

    try:
        threads = [threading.Thread(target=big, daemon=True) for _ in range(CONCURRENT)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        with server.client(timeout=120) as client:
            small = client.post("/generate", json=SMALL)
        steps = _counter(server.url, "medrefine_generation_steps_total")
    finally:
        server.stop(30)

    assert statuses == [504] * CONCURRENT, statuses
    assert small.status_code == 200, small.text
    assert len(small.json()["images_png_base64"]) == 1
    # The six ran some steps (they were in the loop), then stopped long before their 600.
    assert SMALL["steps"] < steps < CONCURRENT * BIG["steps"] / 2, steps
