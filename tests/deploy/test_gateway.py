"""deploy/gateway/nginx.conf over two real replicas on loopback: every /refine about one image lands on
the replica that cached its embedding (each replica's cache-hit counter shows it); round robin does not.
"""

from __future__ import annotations

import httpx
import pytest

from loadtest.gateway import DIGEST_HEADER, Gateway, image_digest
from loadtest.workload import Workload
from tests.service.test_service_http import metric_value
from tests.support.service_fixtures import start_server

PROMPTS = ([20, 20, 100, 100], [24, 18, 96, 104], [30, 30, 90, 90])  # boxes, xyxy in the 128 px image
HITS, MISSES = "medrefine_embedding_cache_hits_total", "medrefine_embedding_cache_misses_total"

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def replicas(service_artifacts, tmp_path_factory):
    started = []
    try:
        for index in range(2):
            started.append(start_server(service_artifacts.art_dir, tmp_path_factory.mktemp(f"replica{index}")))
        yield started
    finally:
        for server in started:
            server.stop()


def cache_counts(replicas) -> dict[str, tuple[float, float]]:
    """``{"127.0.0.1:port": (hits, misses)}`` from each replica's /metrics."""
    counts = {}
    for server in replicas:
        text = httpx.get(server.url + "/metrics", headers=server.headers(), timeout=30).text
        counts[f"127.0.0.1:{server.port}"] = (metric_value(text, HITS), metric_value(text, MISSES))
    return counts


def refine_session(gateway: Gateway, headers: dict[str, str], pngs: list[bytes]) -> list[list[tuple[str, bool]]]:
    """Each image's prompts in turn through the gateway: per image, ``(replica, cache_hit)`` per prompt."""
    answers = []
    with httpx.Client(base_url=gateway.url, headers=headers, timeout=120) as client:
        for png in pngs:
            per_image = []
            for box in PROMPTS:
                response = client.post("/refine", files={"file": ("i.png", png, "image/png")},
                                       data={"box": str(box)}, headers={DIGEST_HEADER: image_digest(png)})
                assert response.status_code == 200, response.text
                per_image.append((response.headers["X-Medrefine-Replica"], response.json()["cache_hit"]))
            answers.append(per_image)
    return answers


def delta(before, after) -> dict[str, tuple[float, float]]:
    return {k: (after[k][0] - before[k][0], after[k][1] - before[k][1]) for k in after}


def test_consistent_hash_sends_follow_ups_to_the_replica_holding_the_image(replicas, tmp_path):
    pngs = [Workload(size=128, pool_size=12, seed=101).png(i) for i in range(12)]
    before = cache_counts(replicas)
    with Gateway([f"127.0.0.1:{s.port}" for s in replicas], tmp_path, policy="hash") as gateway:
        answers = refine_session(gateway, replicas[0].headers(), pngs)
        # A client that sends no digest is still served (spread by request id).
        plain = httpx.post(gateway.url + "/refine", files={"file": ("i.png", pngs[0], "image/png")},
                           data={"box": str(PROMPTS[0])}, headers=replicas[0].headers(), timeout=120)
        assert plain.status_code == 200
    after = cache_counts(replicas)
    for per_image in answers:
        assert len({replica for replica, _ in per_image}) == 1  # one replica per image
        assert [hit for _, hit in per_image] == [False, True, True]  # encoded once, then from its cache
    changed = delta(before, after)
    plain_replica = plain.headers["X-Medrefine-Replica"]
    for replica, (hits, misses) in changed.items():
        images_here = sum(1 for per_image in answers if per_image[0][0] == replica)
        extra = 1 if replica == plain_replica else 0  # the digest-less call: a hit wherever pngs[0] is cached
        assert hits + misses == 3 * images_here + extra
        assert misses == images_here + (extra if not plain.json()["cache_hit"] else 0)


def test_round_robin_loses_follow_ups_to_the_other_replica(replicas, tmp_path):
    """The same session without the hash line: follow-ups alternate replicas and re-encode the image."""
    pngs = [Workload(size=128, pool_size=6, seed=202).png(i) for i in range(6)]
    before = cache_counts(replicas)
    with Gateway([f"127.0.0.1:{s.port}" for s in replicas], tmp_path, policy="round_robin") as gateway:
        answers = refine_session(gateway, replicas[0].headers(), pngs)
    changed = delta(before, cache_counts(replicas))
    misses = sum(m for _, m in changed.values())
    assert misses > len(pngs)  # more encodes than images: some follow-ups reached the other replica
    assert any(len({replica for replica, _ in per_image}) == 2 for per_image in answers)
