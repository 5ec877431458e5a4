"""loadtest/: statistics, the load driver, /metrics parsing, and the generators against real loopback servers.

Pure parts (percentiles, summaries, closed/open-loop scheduling with a timed coroutine, histogram deltas,
soak memory maths) run without a server. The generators, the results document and a few-second soak run
against the real ``python -m service`` and the naive baseline server, both over tiny exported artifacts
(``tests/support/artifact_factory.py``), one thread each. No performance goal is asserted here: the benchmark
measures those (``python -m loadtest bench``).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from loadtest.bench import (
    RESULTS_FORMAT,
    BenchConfig,
    Target,
    assemble_results,
    load_curve,
    offline_throughput,
    private_bentoml_home,
    run_step,
    service_command,
    thread_env,
    validate_results,
    write_results,
)
from loadtest.driver import LoadSpec, RequestFailed, run_load
from loadtest.grpc_load import run_grpc_load
from loadtest.http_load import require_loopback, run_http_load
from loadtest.profile import summarise_collapsed
from loadtest.prom import parse_histogram
from loadtest.soak import RssSample, SoakConfig, judge_requests, memory_growth, run_soak, soak_intervals
from loadtest.stats import RequestRecord, percentile, summarise
from loadtest.system import ServerProcess, free_port, machine_description
from loadtest.workload import Workload
from tests.support.artifact_factory import make_tiny_artifacts

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parents[2]
IMAGE_SIZE = 96


# ------------------------------------------------------------------------------------------ pure parts


def test_percentile_on_known_samples():
    samples = [40.0, 15.0, 50.0, 35.0, 20.0]  # sorted: 15 20 35 40 50
    assert percentile(samples, 0) == 15.0
    assert percentile(samples, 100) == 50.0
    assert percentile(samples, 50) == 35.0
    assert percentile(samples, 40) == pytest.approx(29.0)  # rank 1.6: 20 + 0.6 * (35 - 20)
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([7.0], 99) == 7.0
    rng = np.random.default_rng(0)
    values = rng.exponential(size=1001).tolist()
    for q in (50, 95, 99, 99.9):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12)
    with pytest.raises(ValueError, match="empty"):
        percentile([], 50)
    with pytest.raises(ValueError, match=r"\[0, 100\]"):
        percentile([1.0], 101)


def test_summary_counts_completions_inside_the_window():
    records = [
        RequestRecord(0.0, 0.5),  # before the window
        RequestRecord(0.8, 1.0),  # latency 0.2
        RequestRecord(1.5, 2.0),  # latency 0.5
        RequestRecord(2.0, 2.5, "http-503"),
        RequestRecord(2.6, 3.0),  # latency 0.4
        RequestRecord(3.0, 3.5),  # after
    ]
    s = summarise(records, window=(1.0, 3.0), issued_in_window=5)
    assert (s["completed"], s["ok"], s["errors"]) == (4, 3, 1)
    assert s["error_rate"] == pytest.approx(0.25)
    assert s["errors_by_kind"] == {"http-503": 1}
    assert s["throughput_rps"] == pytest.approx(1.5)
    assert s["offered_rps"] == pytest.approx(2.5)
    assert s["p50_ms"] == pytest.approx(400.0)
    assert s["max_ms"] == pytest.approx(500.0)
    assert s["mean_ms"] == pytest.approx(1000 * (0.2 + 0.5 + 0.4) / 3)
    with pytest.raises(ValueError, match="end > begin"):
        summarise(records, window=(2.0, 2.0))


class _Timed:
    """An async ``send`` that sleeps ``delay_s`` and tracks how many calls overlap."""

    def __init__(self, delay_s: float, fail_every: int = 0) -> None:
        self.delay_s = delay_s
        self.fail_every = fail_every
        self.inflight = 0
        self.max_inflight = 0
        self.calls: list[int] = []

    async def __call__(self, index: int) -> None:
        self.calls.append(index)
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            await asyncio.sleep(self.delay_s)
            if self.fail_every and index % self.fail_every == 0:
                raise RequestFailed("http-503", "queue full")
            if index == 1 and self.fail_every:
                raise ConnectionResetError("peer reset")
        finally:
            self.inflight -= 1


def test_closed_loop_is_bounded_by_count_and_concurrency():
    send = _Timed(0.01)
    run = asyncio.run(run_load(send, LoadSpec(mode="closed", concurrency=4, duration_s=30, max_requests=25)))
    assert run.issued == 25 and len(run.records) == 25
    assert sorted(send.calls) == list(range(25))
    assert send.max_inflight == 4
    assert run.stopped_by == "max_requests"
    summary = run.summary()
    assert summary["ok"] == 25 and summary["errors_total"] == 0
    assert 9.0 <= summary["p50_ms"] < 500.0  # the 10 ms sleep plus event-loop scheduling


def test_closed_loop_is_bounded_by_time():
    send = _Timed(0.05)
    started = time.perf_counter()
    run = asyncio.run(run_load(send, LoadSpec(mode="closed", concurrency=2, duration_s=0.5, warmup_s=0.1)))
    elapsed = time.perf_counter() - started
    assert 0.5 <= elapsed < 2.0
    assert 6 <= run.issued <= 22  # 2 workers x 0.5 s / 0.05 s = 20, fewer when the machine is busy
    assert len(run.records) == run.issued  # requests in flight at the deadline are awaited
    summary = run.summary()
    assert summary["window_s"] == pytest.approx(0.4)
    assert summary["throughput_rps"] == pytest.approx(summary["ok"] / 0.4)


def test_open_loop_keeps_its_schedule_and_caps_inflight():
    send = _Timed(0.03)
    run = asyncio.run(run_load(send, LoadSpec(mode="open", rate_rps=50, arrival="fixed", duration_s=0.5)))
    assert 24 <= run.issued <= 26 and run.dropped == 0
    assert len(run.records) == run.issued
    starts = sorted(r.start for r in run.records)
    assert np.median(np.diff(starts)) == pytest.approx(0.02, abs=0.01)  # not paced by the 30 ms latency
    assert send.max_inflight >= 2

    slow = _Timed(0.1)
    capped = asyncio.run(run_load(slow, LoadSpec(mode="open", rate_rps=200, arrival="fixed", duration_s=0.3,
                                                 max_inflight=3)))
    assert slow.max_inflight <= 3
    assert capped.issued + capped.dropped == 60
    assert capped.dropped >= 30

    bounded = asyncio.run(run_load(_Timed(0.001), LoadSpec(mode="open", rate_rps=1000, duration_s=10,
                                                            max_requests=40, seed=3)))
    assert bounded.issued == 40 and bounded.stopped_by == "max_requests"


def test_failures_are_recorded_by_kind():
    send = _Timed(0.001, fail_every=3)
    run = asyncio.run(run_load(send, LoadSpec(mode="closed", concurrency=1, duration_s=10, max_requests=9)))
    summary = run.summary()
    assert summary["errors_by_kind"] == {"ConnectionResetError": 1, "http-503": 3}  # indices 0, 3, 6 and 1
    assert summary["ok"] == 5 and summary["error_rate"] == pytest.approx(4 / 9)


def test_load_spec_rejects_bad_values():
    with pytest.raises(ValueError, match="rate_rps"):
        LoadSpec(mode="open", rate_rps=0)
    with pytest.raises(ValueError, match="mode"):
        LoadSpec(mode="burst")
    with pytest.raises(ValueError, match="warmup_s"):
        LoadSpec(duration_s=1.0, warmup_s=1.0)


def test_metrics_histogram_delta_becomes_a_distribution():
    registry = CollectorRegistry()
    hist = Histogram("medrefine_batch_size", "batch sizes", ["worker"], buckets=(1, 2, 4, 8, 16),
                     registry=registry)
    for size in (1, 1, 3, 8):
        hist.labels(worker="a").observe(size)
    before = parse_histogram(generate_latest(registry).decode(), "medrefine_batch_size")
    hist.labels(worker="a").observe(16)
    hist.labels(worker="b").observe(5)
    hist.labels(worker="b").observe(2)
    after = parse_histogram(generate_latest(registry).decode(), "medrefine_batch_size")
    assert after.count == 7 and after.total == pytest.approx(36.0)
    dist = (after - before).distribution()
    assert dist["count"] == 3
    assert dist["mean"] == pytest.approx((16 + 5 + 2) / 3)
    assert [(row["le"], row["count"]) for row in dist["buckets"]] == [
        (1, 0), (2, 1), (4, 0), (8, 1), (16, 1), ("+Inf", 0)]
    assert parse_histogram(generate_latest(registry).decode(), "medrefine_missing") is None


def test_load_targets_must_be_loopback():
    assert require_loopback("http://127.0.0.1:3000") == "http://127.0.0.1:3000"
    require_loopback("localhost:8001")
    require_loopback("http://[::1]:3000")
    for url in ("http://10.0.0.7:3000", "8.8.8.8:8001", "http://192.168.1.2"):
        with pytest.raises(ValueError, match="not a loopback"):
            require_loopback(url)
    from loadtest.__main__ import main

    assert main(["grpc", "--url", "10.1.2.3:8001", "--duration-s", "1"]) == 2


def test_soak_memory_growth_and_intervals():
    mib = 1024 * 1024
    samples = [RssSample(t=float(t), rss_bytes=(100 + (20 if t < 10 else 0) + t) * mib, processes=2,
                         largest_bytes=0) for t in range(0, 61, 5)]
    growth = memory_growth(samples, warmup_s=10.0)
    assert growth["rss_at_warmup_mib"] == pytest.approx(110.0)
    assert growth["rss_end_mib"] == pytest.approx(155.0)  # mean of 150, 155, 160
    assert growth["growth_mib"] == pytest.approx(45.0)
    assert growth["slope_mib_per_min"] == pytest.approx(60.0)  # 1 MiB per second
    assert growth["rss_max_mib"] == pytest.approx(160.0)
    records = [RequestRecord(0.1, 0.3), RequestRecord(0.5, 1.2, "http-503"), RequestRecord(1.5, 1.9),
               RequestRecord(1.8, 2.4)]  # the last one answers after the end: counted in the last interval
    rows = soak_intervals(records, duration_s=2.0, interval_s=1.0)
    assert [(r["answered"], r["errors"]) for r in rows] == [(1, 0), (3, 1)]
    assert rows[0]["throughput_rps"] == pytest.approx(1.0)
    assert rows[1]["p50_ms"] == pytest.approx(500.0)


def test_soak_judges_faults_shedding_lost_and_hung_requests_apart():
    config = SoakConfig(minutes=1.0, max_shed_fraction=0.01, hung_after_s=40.0, url="http://127.0.0.1:1",
                        server_pid=1)
    fine = [RequestRecord(float(i), float(i) + 0.05) for i in range(200)]
    shed_two = fine[:198] + [RequestRecord(1.0, 1.01, "http-429", shed=True),
                             RequestRecord(2.0, 2.01, "http-503", shed=True)]
    verdict = judge_requests(shed_two, 200, config)
    assert (verdict["errors"], verdict["shed"], verdict["shed_budget"], verdict["passed"]) == (0, 2, 2, True)
    assert not judge_requests(shed_two + [RequestRecord(3.0, 3.01, "http-429", shed=True)], 201, config)["passed"]
    transport = judge_requests(fine[:199] + [RequestRecord(4.0, 4.2, "ReadError")], 200, config)
    assert transport["errors_by_kind"] == {"ReadError": 1} and not transport["passed"]  # a fault until shown otherwise
    unsheddable = judge_requests(fine[:199] + [RequestRecord(4.0, 4.2, "http-503")], 200, config)  # no Retry-After
    assert unsheddable["errors"] == 1 and not unsheddable["passed"]
    hung = judge_requests(fine[:199] + [RequestRecord(5.0, 50.0)], 200, config)  # a success, but after 45 s
    assert hung["hung"] == 1 and hung["errors"] == 0 and not hung["passed"]
    lost = judge_requests(fine[:199], 200, config)
    assert lost["lost"] == 1 and not lost["passed"]


def test_collapsed_stack_summary():
    text = "\n".join([
        'process 7:"python -m service";Thread.run (threading.py:1);segment (inference/pipeline.py:10);run (ort.py:5) 6',
        'process 7:"python -m service";Thread.run (threading.py:1);segment (inference/pipeline.py:12);gate (g.py:3) 3',
        'process 7:"python -m service";select (selectors.py:9) 1',
        "",
    ])
    summary = summarise_collapsed(text, top=3)
    assert summary["samples"] == 10
    assert summary["self"] == [{"function": "run (ort.py)", "share": 0.6}, {"function": "gate (g.py)", "share": 0.3},
                               {"function": "select (selectors.py)", "share": 0.1}]
    assert summary["inclusive"][0] == {"function": "segment (inference/pipeline.py)", "share": 0.9}  # lines merged
    assert all(not row["function"].startswith(("process", "Thread.run")) for row in summary["inclusive"])
    with pytest.raises(ValueError, match="line 1"):
        summarise_collapsed("no count here")


# ------------------------------------------------------------------------------------------ real servers


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_artifacts(tmp_path_factory.mktemp("loadtest"), use_default_checkpoint=False)


@pytest.fixture(scope="module")
def service(tiny, tmp_path_factory):
    port, grpc_port = free_port(), free_port()
    env = {**thread_env(1), **private_bentoml_home(tmp_path_factory.mktemp("bentoml")),
           "MEDREFINE_INTRA_OP_THREADS": "1"}
    server = ServerProcess(service_command(tiny.art_dir, port=port, grpc_port=grpc_port, backend="onnxruntime"),
                           ready_url=f"http://127.0.0.1:{port}/readyz", env=env, startup_timeout_s=180,
                           log_path=tmp_path_factory.mktemp("logs") / "service.log", name="service")
    with server:
        server.http_url = f"http://127.0.0.1:{port}"
        server.grpc_url = f"127.0.0.1:{grpc_port}"
        yield server


@pytest.fixture(scope="module")
def naive(tiny, tmp_path_factory):
    port = free_port()
    server = ServerProcess(
        [sys.executable, "-m", "loadtest.naive_server", "--model", str(tiny.run_dir), "--port", str(port),
         "--threads", "1"],
        ready_url=f"http://127.0.0.1:{port}/healthz", env=thread_env(1), startup_timeout_s=120,
        log_path=tmp_path_factory.mktemp("logs") / "naive.log", name="naive server")
    with server:
        server.http_url = f"http://127.0.0.1:{port}"
        yield server


@pytest.fixture(scope="module")
def workload():
    return Workload(size=IMAGE_SIZE, pool_size=16, bases=2)


def test_workload_images_are_distinct_pngs(workload):
    from core.imageio import decode_image

    digests = {workload.image(i).tobytes() for i in range(workload.pool_size)}
    assert len(digests) == workload.pool_size
    decoded = decode_image(workload.png(5)).pixels
    np.testing.assert_allclose(decoded, workload.float_image(5), atol=1e-6)
    assert workload.image(5 + workload.pool_size) is workload.image(5)


def test_naive_server_under_closed_and_open_loop(naive, workload):
    closed = asyncio.run(run_http_load(naive.http_url, "rest", LoadSpec(mode="closed", concurrency=3,
                                                                        duration_s=30, max_requests=9), workload))
    assert closed.issued == 9 and len(closed.records) == 9
    assert all(r.ok for r in closed.records), [r.error for r in closed.records]
    opened = asyncio.run(run_http_load(naive.http_url, "rest", LoadSpec(mode="open", rate_rps=4, arrival="fixed",
                                                                        duration_s=1.5), workload))
    assert opened.issued == 6 and all(r.ok for r in opened.records)


@pytest.mark.parametrize("protocol", ["rest", "oip-http", "grpc"])
def test_service_protocols_and_batch_size_distribution(service, workload, protocol):
    url = service.grpc_url if protocol == "grpc" else service.http_url
    target = Target(f"service-{protocol}", protocol, url, f"{service.http_url}/metrics", service.pid)
    # Bounded by count, not time: on a busy machine the first requests alone may take seconds.
    step = run_step(target, LoadSpec(mode="closed", concurrency=4, duration_s=60.0, max_requests=12), workload)
    assert step["issued_total"] == 12 and step["answered_total"] == 12
    assert step["errors_total"] == 0, step["errors_by_kind"]
    assert step["p50_ms"] > 0 and step["p99_ms"] >= step["p95_ms"] >= step["p50_ms"]
    dist = step["batch_size_distribution"]
    assert dist is not None, "medrefine_batch_size missing from /metrics"
    assert sum(row["count"] for row in dist["buckets"]) == dist["count"]
    assert 1 <= dist["count"] <= 12 and dist["mean"] * dist["count"] == pytest.approx(12)  # 12 images in batches
    assert step["cpu"]["server_cores"] > 0


def test_grpc_generator_bounds_an_open_loop(service, workload):
    run = asyncio.run(run_grpc_load(service.grpc_url, LoadSpec(mode="open", rate_rps=8, arrival="poisson",
                                                               duration_s=30, max_requests=10, seed=1), workload))
    assert run.issued == 10 and len(run.records) == 10 and all(r.ok for r in run.records)


def test_results_document_has_the_schema_and_ratios(service, naive, tiny, workload, tmp_path):
    config = BenchConfig(threads=1, image_size=IMAGE_SIZE, duration_s=1.2, warmup_s=0.2, min_requests=1,
                         max_step_s=2.0, max_batch_size=2,
                         offline_batch_sizes=(1, 2), service_concurrency=(2,), naive_concurrency=(1,),
                         open_fractions=(0.7,), naive_open_fractions=())
    offline = offline_throughput(tiny.art_dir, batch_sizes=(1, 2), threads=1, duration_s=0.2, image_size=IMAGE_SIZE)
    assert offline["2"]["calls"] >= 3 and offline["2"]["throughput_ips"] > 0
    naive_curve = load_curve(Target("naive-rest", "rest", naive.http_url, None, naive.pid), config, workload,
                             concurrencies=(1,), fractions=())
    served = {"settings": {}}
    for protocol, url in (("rest", service.http_url), ("grpc", service.grpc_url)):
        target = Target(f"service-{protocol}", protocol, url, f"{service.http_url}/metrics", service.pid)
        served[protocol] = load_curve(target, config, workload, concurrencies=(2,), fractions=(0.7,))
    manifest = json.loads((tiny.art_dir / "manifest.json").read_text())
    data = assemble_results(config, machine=machine_description(), created="2026-01-01T00:00:00+00:00",
                            offline=offline, naive=naive_curve, served=served, manifest=manifest,
                            run_dir=str(tiny.run_dir), loads=[0.0], workload_pool=workload.pool_size, duration_s=1.0)
    out = write_results(data, tmp_path / "bench.json")
    loaded = json.loads(out.read_text())
    validate_results(loaded)
    assert loaded["format"] == RESULTS_FORMAT
    rest_peak = loaded["served"]["rest"]["peak_throughput_rps"]
    assert rest_peak > 0 and loaded["naive"]["peak_throughput_rps"] > 0
    assert loaded["served_over_offline"] == pytest.approx(rest_peak / offline["2"]["throughput_ips"])
    assert loaded["served_over_naive"] == pytest.approx(rest_peak / loaded["naive"]["peak_throughput_rps"])
    at70 = loaded["served"]["grpc"]["at_70pct"]
    assert at70["p99_over_p50"] == pytest.approx(at70["p99_ms"] / at70["p50_ms"])
    assert set(loaded["goals"]) == {"served_over_offline", "served_over_naive", "p99_over_p50_at_70pct",
                                    "ours_over_best_peer"}
    assert loaded["p99_ms_at_70pct_grpc"] == at70["p99_ms"]  # no peers measured: no ratio, our p99 still reported
    assert loaded["ours_over_best_peer_grpc"] is None
    assert loaded["ours_over_best_peer_rest"] == pytest.approx(rest_peak / loaded["naive"]["peak_throughput_rps"])
    for key in ("cpu_model", "logical_cores", "ram_bytes", "os", "python", "torch", "onnxruntime", "git_sha"):
        assert loaded["machine"][key] is not None, key
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "bench-servers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    broken = dict(loaded)
    del broken["served_over_naive"]
    with pytest.raises(ValueError, match="served_over_naive"):
        validate_results(broken)


def test_soak_short_run_reports_errors_and_rss(service, tmp_path):
    config = SoakConfig(minutes=0.05, rate_rps=4.0, sample_s=0.5, interval_s=1.0, image_size=IMAGE_SIZE,
                        url=service.http_url, server_pid=service.pid, out=str(tmp_path / "soak.json"),
                        max_errors=0, max_growth_mb=4096)
    report, passed = run_soak(config)
    assert passed and report["errors"] == 0 and report["server_alive_at_end"]
    assert report["answered"] == report["issued"] >= 8
    assert len(report["rss"]) >= 5 and all(s["rss_bytes"] > 50 * 1024 * 1024 for s in report["rss"])
    assert report["rss"][0]["processes"] >= 2  # the BentoML entry process and its worker
    assert sum(row["answered"] for row in report["intervals"]) == report["answered"]
    assert report["memory"]["growth_mib"] is not None
    assert json.loads((tmp_path / "soak.json").read_text())["passed"] is True
    assert (tmp_path / "soak.png").stat().st_size > 1000


def _locust(host: str, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "locust", "-f", str(REPO / "loadtest" / "locustfile.py"), "--headless",
           "--host", host, "--json", "--only-summary", "--medrefine-image-size", str(IMAGE_SIZE), *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_locust_users_stop_at_the_request_cap(service):
    started = time.perf_counter()
    done = _locust(service.http_url, "-u", "2", "-r", "2", "--run-time", "60s", "--medrefine-max-requests", "8")
    assert done.returncode == 0, done.stderr[-2000:]
    assert time.perf_counter() - started < 40  # stopped by the cap, not by --run-time
    stats = {row["name"]: row for row in json.loads(done.stdout)}
    assert set(stats) == {"POST /segment", "POST /v2/models/segment/infer"}
    assert sum(row["num_requests"] for row in stats.values()) == 8
    assert sum(row["num_failures"] for row in stats.values()) == 0


def test_locust_refuses_a_non_loopback_host():
    done = _locust("http://10.20.30.40:3000", "-u", "1", "-r", "1", "--run-time", "20s", timeout=60)
    assert done.returncode == 2
    assert "not a loopback address" in done.stderr


# RSS growth allowed over the soak's second minute. A fresh-clone CI run on a quiet machine (a higher probed peak,
# so more in flight and larger ONNX Runtime arenas) measured 36.8 MiB there while the arenas were still growing;
# a leak of 20 KiB per request at the ~40 req/s of that minute still fails it. `make soak` (10 minutes) is the
# leak check proper.
SOAK_GROWTH_MIB = 48


def test_two_minute_soak_at_half_of_peak_has_no_errors_and_bounded_rss(service, tmp_path):
    """CI's soak: two minutes at 50 % of the probed peak against the live service (the 10-minute
    version is `make soak`). Growth is measured over the second minute: at ~80 req/s the server's RSS
    climbs for about a minute (allocator and ONNX Runtime arenas reaching the sizes the load needs) and
    then stays flat (measured: 423 -> 612 MiB in the first 60 s, 612 -> 622 MiB over the next 120 s), so
    a window inside the climb would flag warm-up as a leak."""
    config = SoakConfig(minutes=2.0, fraction=0.5, peak_probe_s=5.0, sample_s=2.0, interval_s=10.0,
                        warmup_fraction=0.5, image_size=IMAGE_SIZE, url=service.http_url, server_pid=service.pid,
                        out=str(tmp_path / "soak.json"), max_errors=0, max_growth_mb=SOAK_GROWTH_MIB)
    report, passed = run_soak(config)
    summary = {k: report[k] for k in ("errors_by_kind", "shed_by_kind", "dropped", "generator_max_lag_s", "cpu")}
    assert report["errors"] == 0 and report["server_alive_at_end"], summary  # faults: none
    assert report["answered"] == report["issued"] > 0 and report["hung"] == 0, summary  # nothing lost or hung
    assert report["shed"] <= report["shed_budget"] == int(0.01 * report["issued"]), summary
    assert report["memory"]["growth_mib"] is not None and report["memory"]["growth_mib"] < SOAK_GROWTH_MIB
    assert passed
