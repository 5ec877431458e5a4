"""Soak test: the service at a fraction of its peak for N minutes; errors and server memory over time."""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

from loadtest.driver import LoadRun, LoadSpec, run_load
from loadtest.stats import RequestRecord, latency_summary
from loadtest.system import CpuAccount, ServerProcess, free_port, machine_description, process_tree_rss
from loadtest.workload import Workload
from service.settings import ServiceSettings

__all__ = ["RssSample", "SoakConfig", "judge_requests", "memory_growth", "run_soak", "soak_intervals"]

MIB = 1024 * 1024


@dataclass(frozen=True)
class SoakConfig:
    minutes: float = 10.0
    fraction: float = 0.5
    rate_rps: float | None = None
    protocol: str = "rest"
    sample_s: float = 5.0
    interval_s: float = 30.0
    warmup_fraction: float = 0.2
    peak_probe_s: float = 10.0
    image_size: int = 256
    max_errors: int = 0
    max_shed_fraction: float = 0.01
    hung_after_s: float = 40.0  # the server's request_timeout_s (30) plus its 5 s answer grace and slack
    max_growth_mb: float = 64.0
    model: str = "default"
    artifacts: str | None = None
    backend: str = "onnxruntime"
    threads: int = 0
    max_batch_size: int = ServiceSettings.max_batch_size
    url: str | None = None
    server_pid: int | None = None
    out: str | None = None

    def __post_init__(self) -> None:
        if not self.minutes > 0:
            raise ValueError(f"soak --minutes must be > 0, got {self.minutes}")
        if not 0 < self.fraction <= 1.5:
            raise ValueError(f"soak --fraction must be in (0, 1.5], got {self.fraction}")
        if not 0 <= self.max_shed_fraction <= 1:
            raise ValueError(f"soak --max-shed-fraction must be in [0, 1], got {self.max_shed_fraction}")
        if self.protocol not in ("rest", "oip-http", "grpc"):
            raise ValueError(f"soak --protocol must be rest, oip-http or grpc, got {self.protocol!r}")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"soak --warmup-fraction must be in [0, 1), got {self.warmup_fraction}")
        if (self.url is None) != (self.server_pid is None):
            raise ValueError("soak: --url and --server-pid go together (attach to a running server)")


@dataclass(frozen=True)
class RssSample:
    """RSS of the server's process tree ``t`` seconds into the soak."""

    t: float
    rss_bytes: int
    processes: int
    largest_bytes: int


class RssSampler:
    """Samples the process tree of ``pid`` every ``period_s`` on the running event loop."""

    def __init__(self, pid: int, period_s: float) -> None:
        self.pid = pid
        self.period_s = period_s
        self.samples: list[RssSample] = []
        self._t0 = time.perf_counter()

    def sample(self) -> RssSample:
        tree = process_tree_rss(self.pid)
        sizes = [v["rss_bytes"] for v in tree["by_pid"].values()]
        sample = RssSample(time.perf_counter() - self._t0, tree["total_bytes"], len(sizes), max(sizes, default=0))
        self.samples.append(sample)
        return sample

    async def run(self) -> None:
        self._t0 = time.perf_counter()
        while True:
            self.sample()
            await asyncio.sleep(self.period_s)


def memory_growth(samples: list[RssSample], warmup_s: float) -> dict[str, Any]:
    """RSS growth after ``warmup_s``: end minus start of the post-warm-up samples, and the slope.

    The end value is the mean of the last three samples (smooths allocator jitter). Returns MiB values;
    ``slope_mib_per_min`` is the least-squares slope over the post-warm-up samples (None with < 2).
    """
    after = [s for s in samples if s.t >= warmup_s] or samples[-1:]
    if not after:
        return {"rss_at_warmup_mib": None, "rss_end_mib": None, "growth_mib": None, "slope_mib_per_min": None,
                "rss_max_mib": None}
    start = after[0].rss_bytes / MIB
    tail = after[-3:]
    end = sum(s.rss_bytes for s in tail) / len(tail) / MIB
    slope = None
    if len(after) >= 2:
        ts = [s.t for s in after]
        ys = [s.rss_bytes / MIB for s in after]
        mt, my = sum(ts) / len(ts), sum(ys) / len(ys)
        var = sum((t - mt) ** 2 for t in ts)
        slope = 60.0 * sum((t - mt) * (y - my) for t, y in zip(ts, ys, strict=True)) / var if var > 0 else 0.0
    return {"rss_at_warmup_mib": start, "rss_end_mib": end, "growth_mib": end - start,
            "slope_mib_per_min": slope, "rss_max_mib": max(s.rss_bytes for s in samples) / MIB}


def judge_requests(records: list[RequestRecord], issued: int, config: SoakConfig) -> dict[str, Any]:
    """What the soak judges of the requests: faults (anything but success or documented shedding; a transport
    error is a fault), shedding against its budget, lost (sent, never answered) and hung (answered later
    than ``config.hung_after_s``, even successfully).

    Returns ``{"errors", "errors_by_kind", "shed", "shed_by_kind", "shed_budget", "hung", "lost", "passed"}``.
    """
    kinds: dict[str, int] = {}
    shed_kinds: dict[str, int] = {}
    for r in records:
        if not r.ok:
            target = shed_kinds if r.shed else kinds
            target[r.error] = target.get(r.error, 0) + 1
    errors, shed = sum(kinds.values()), sum(shed_kinds.values())
    hung = sum(1 for r in records if r.latency_s > config.hung_after_s)
    lost = issued - len(records)
    shed_budget = int(config.max_shed_fraction * issued)
    passed = errors <= config.max_errors and shed <= shed_budget and hung == 0 and lost == 0
    return {"errors": errors, "errors_by_kind": kinds, "shed": shed, "shed_by_kind": shed_kinds,
            "shed_budget": shed_budget, "hung": hung, "lost": lost, "passed": passed}


def soak_intervals(records: list[RequestRecord], duration_s: float, interval_s: float) -> list[dict[str, Any]]:
    """Per-interval (by completion time) answered count, faults, shed requests, throughput and latency
    percentiles."""
    count = max(1, int(-(-duration_s // interval_s)))
    rows = []
    for k in range(count):
        begin = k * interval_s
        end = (k + 1) * interval_s if k < count - 1 else float("inf")  # the last one takes the tail answers
        inside = [r for r in records if begin <= r.end < end]
        ok = [r.latency_s for r in inside if r.ok]
        span = min(end, duration_s) - begin
        span = span if span > 0 else interval_s
        shed = sum(1 for r in inside if r.shed)
        rows.append({"t_start_s": begin, "answered": len(inside), "errors": len(inside) - len(ok) - shed,
                     "shed": shed, "throughput_rps": len(ok) / span, **latency_summary(ok)})
    return rows


async def _soak_load(config: SoakConfig, url: str, spec: LoadSpec, workload: Workload,
                     sampler: RssSampler) -> LoadRun:
    sampling = asyncio.create_task(sampler.run())
    try:
        if config.protocol == "grpc":
            import tritonclient.grpc.aio as grpcclient

            from loadtest.grpc_load import grpc_sender
            from loadtest.http_load import require_loopback

            client = grpcclient.InferenceServerClient(url=require_loopback(url))
            try:
                return await run_load(grpc_sender(client, workload), spec)
            finally:
                await client.close()
        from loadtest.http_load import http_client, http_sender

        async with http_client(url, connections=spec.max_inflight, timeout_s=60.0) as client:
            return await run_load(http_sender(client, config.protocol, workload), spec)
    finally:
        sampling.cancel()
        sampler.sample()  # the final value


def _probe_peak(config: SoakConfig, url: str, pid: int, workload: Workload) -> float:
    from loadtest.bench import Target, run_step

    concurrency = 2 * config.max_batch_size
    target = Target("soak-probe", config.protocol, url, None, pid)
    run_step(target, LoadSpec(mode="closed", concurrency=concurrency, duration_s=max(2.0, config.peak_probe_s / 3)),
             workload)
    spec = LoadSpec(mode="closed", concurrency=concurrency, duration_s=config.peak_probe_s,
                    warmup_s=config.peak_probe_s / 5)
    return float(run_step(target, spec, workload)["throughput_rps"])


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(8, 8), sharex=True)
    rss = report["rss"]
    axes[0].plot([s["t"] / 60 for s in rss], [s["rss_bytes"] / MIB for s in rss], "-", label="server tree RSS")
    axes[0].axvline(report["warmup_s"] / 60, color="r", ls=":", label="end of warm-up")
    axes[0].set_ylabel("RSS (MiB)")
    axes[0].legend(fontsize=8)
    rows = report["intervals"]
    width = rows[1]["t_start_s"] - rows[0]["t_start_s"] if len(rows) > 1 else report["minutes"] * 60
    t = [(r["t_start_s"] + width / 2) / 60 for r in rows]  # interval midpoints
    axes[1].plot(t, [r["p50_ms"] for r in rows], "o-", label="p50")
    axes[1].plot(t, [r["p99_ms"] for r in rows], "^-", label="p99")
    axes[1].set_ylabel("latency (ms)")
    axes[1].legend(fontsize=8)
    axes[2].plot(t, [r["throughput_rps"] for r in rows], "o-", label="answered OK / s")
    axes[2].bar(t, [r["errors"] for r in rows], width=0.3 * width / 60, color="r", label="errors")
    axes[2].set_ylabel("per interval")
    axes[2].set_xlabel("minutes")
    axes[2].legend(fontsize=8)
    growth = report["memory"]
    fig.suptitle(f"soak {report['protocol']} at {report['rate_rps']:.1f} rps for {report['minutes']} min: "
                 f"{report['errors']} errors, RSS growth {growth['growth_mib'] or 0:.1f} MiB after warm-up", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_soak(config: SoakConfig) -> tuple[dict[str, Any], bool]:
    """Run the soak; returns the report and whether it passed (errors and growth within limits)."""
    from loadtest.bench import prepare_artifacts, private_bentoml_home, service_command, thread_env

    workload = Workload(size=config.image_size)
    duration_s = 60.0 * config.minutes
    with tempfile.TemporaryDirectory(prefix="medrefine-soak-") as tmp:
        server: ServerProcess | None = None
        if config.url is None:
            from inference.engines import physical_cores

            art_dir, _ = prepare_artifacts(config.model, config.artifacts, Path(tmp))
            threads = config.threads or physical_cores()
            port, grpc_port = free_port(), free_port()
            env = {**thread_env(threads), **private_bentoml_home(tmp), "MEDREFINE_INTRA_OP_THREADS": str(threads),
                   "MEDREFINE_MAX_BATCH_SIZE": str(config.max_batch_size)}
            server = ServerProcess(service_command(art_dir, port=port, grpc_port=grpc_port, backend=config.backend),
                                   ready_url=f"http://127.0.0.1:{port}/readyz", env=env,
                                   log_path=Path(tmp) / "service.log", name="service").start()
            url = f"127.0.0.1:{grpc_port}" if config.protocol == "grpc" else f"http://127.0.0.1:{port}"
            pid = server.pid
        else:
            url, pid = config.url, int(config.server_pid)
        try:
            peak = None
            rate = config.rate_rps
            if rate is None:
                peak = _probe_peak(config, url, pid, workload)
                if peak <= 0:
                    raise RuntimeError(f"soak: peak probe at {url} answered no request successfully")
                rate = config.fraction * peak
            print(f"soak: {config.protocol} at {rate:.2f} rps for {config.minutes} min", file=sys.stderr, flush=True)
            spec = LoadSpec(mode="open", rate_rps=rate, arrival="poisson", duration_s=duration_s,
                            max_inflight=256, seed=0)
            sampler = RssSampler(pid, config.sample_s)
            cpu = CpuAccount(pid)
            snap = cpu.snapshot()
            started = time.perf_counter()
            run = asyncio.run(_soak_load(config, url, spec, workload, sampler))
            wall = time.perf_counter() - started
            cpu_use = CpuAccount.delta(snap, cpu.snapshot())
            server_alive = server.proc.poll() is None if server is not None else psutil.pid_exists(pid)
        finally:
            exit_code = server.stop() if server is not None else None
    warmup_s = config.warmup_fraction * duration_s
    memory = memory_growth(sampler.samples, warmup_s)
    verdict = judge_requests(run.records, run.issued, config)
    ok_latencies = [r.latency_s for r in run.records if r.ok]
    passed = (verdict["passed"] and server_alive
              and (memory["growth_mib"] is None or memory["growth_mib"] <= config.max_growth_mb))
    report: dict[str, Any] = {
        "format": "medrefine-soak/1",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_description(),
        "config": asdict(config),
        "protocol": config.protocol,
        "minutes": config.minutes,
        "peak_rps": peak,
        "rate_rps": rate,
        "wall_s": wall,
        "issued": run.issued,
        "answered": len(run.records),
        "dropped": run.dropped,
        **{k: v for k, v in verdict.items() if k != "passed"},
        "generator_max_lag_s": run.max_lag_s,
        "generator_late_sends": run.late_sends,
        "latency": latency_summary(ok_latencies),
        "cpu": cpu_use,
        "warmup_s": warmup_s,
        "memory": memory,
        "rss": [asdict(s) for s in sampler.samples],
        "intervals": soak_intervals(run.records, duration_s, min(config.interval_s, duration_s)),
        "server_alive_at_end": server_alive,
        "server_exit_code": exit_code,
        "limits": {"max_errors": config.max_errors, "max_shed_fraction": config.max_shed_fraction,
                   "hung_after_s": config.hung_after_s, "max_growth_mb": config.max_growth_mb},
        "passed": passed,
    }
    if config.out:
        out = Path(config.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        plot = out.with_suffix(".png")
        _plot(report, plot)
        report["plot"] = plot.name
        out.write_text(json.dumps(report, indent=2))
    return report, passed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = SoakConfig()
    parser.add_argument("--minutes", type=float, default=d.minutes)
    parser.add_argument("--fraction", type=float, default=d.fraction, help="fraction of peak to offer")
    parser.add_argument("--rate", type=float, default=None, help="offered requests/s (skips the peak probe)")
    parser.add_argument("--protocol", default=d.protocol, choices=("rest", "oip-http", "grpc"))
    parser.add_argument("--sample-s", type=float, default=d.sample_s, help="RSS sampling period")
    parser.add_argument("--interval-s", type=float, default=d.interval_s, help="latency/error report interval")
    parser.add_argument("--warmup-fraction", type=float, default=d.warmup_fraction)
    parser.add_argument("--peak-probe-s", type=float, default=d.peak_probe_s)
    parser.add_argument("--image-size", type=int, default=d.image_size)
    parser.add_argument("--max-errors", type=int, default=d.max_errors, help="faults allowed (not shedding)")
    parser.add_argument("--hung-after-s", type=float, default=d.hung_after_s,
                        help="an answer later than this is a hung request (a fault)")
    parser.add_argument("--max-shed-fraction", type=float, default=d.max_shed_fraction,
                        help="429/503 with Retry-After allowed, as a fraction of requests sent")
    parser.add_argument("--max-growth-mb", type=float, default=d.max_growth_mb)
    parser.add_argument("--model", default=d.model)
    parser.add_argument("--artifacts", default=None)
    parser.add_argument("--backend", default=d.backend)
    parser.add_argument("--threads", type=int, default=d.threads)
    parser.add_argument("--max-batch-size", type=int, default=d.max_batch_size)
    parser.add_argument("--url", default=None, help="attach to a running loopback server instead of starting one")
    parser.add_argument("--server-pid", type=int, default=None, help="its process id (RSS is read from its tree)")
    parser.add_argument("--out", default=None, help="report JSON (a PNG is written beside it)")


def run(args: argparse.Namespace) -> int:
    try:
        config = _config_from_args(args)
    except ValueError as exc:
        print(f"python -m loadtest soak: {exc}", file=sys.stderr)
        return 2
    report, passed = run_soak(config)
    print(json.dumps({k: report[k] for k in ("rate_rps", "answered", "errors", "errors_by_kind", "shed",
                                              "hung", "dropped", "generator_max_lag_s", "latency", "memory", "passed")},
                     indent=2))
    return 0 if passed else 1


def _config_from_args(args: argparse.Namespace) -> SoakConfig:
    return SoakConfig(
        minutes=args.minutes, fraction=args.fraction, rate_rps=args.rate, protocol=args.protocol,
        sample_s=args.sample_s, interval_s=args.interval_s, warmup_fraction=args.warmup_fraction,
        peak_probe_s=args.peak_probe_s, image_size=args.image_size, max_errors=args.max_errors,
        max_shed_fraction=args.max_shed_fraction, hung_after_s=args.hung_after_s,
        max_growth_mb=args.max_growth_mb, model=args.model, artifacts=args.artifacts, backend=args.backend,
        threads=args.threads, max_batch_size=args.max_batch_size, url=args.url, server_pid=args.server_pid,
        out=args.out,
    )
