"""The one benchmark command: offline pipeline, naive baseline and the served model on one machine."""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from loadtest.driver import LoadSpec
from loadtest.grpc_load import run_grpc_load
from loadtest.http_load import run_http_load
from loadtest.peers.compare import plot_servers, verdict
from loadtest.peers.launch import PEER_MAX_BATCH_SIZE, PEERS, launch_peer
from loadtest.prom import parse_histogram
from loadtest.system import (
    REPO_ROOT,
    CpuAccount,
    ServerProcess,
    free_port,
    machine_description,
    machine_slug,
)
from loadtest.tenants import busiest_processes, instruction_sets
from loadtest.workload import Workload
from service.settings import ServiceSettings

__all__ = [
    "BenchConfig",
    "assemble_results",
    "GOALS",
    "RESULTS_FORMAT",
    "Target",
    "find_peak",
    "offline_throughput",
    "prepare_artifacts",
    "private_bentoml_home",
    "run_bench",
    "run_step",
    "served_ratios",
    "service_command",
    "thread_env",
    "validate_results",
    "write_results",
]

RESULTS_FORMAT = "medrefine-loadtest/1"
RESULTS_DIR = REPO_ROOT / "loadtest" / "results"
BATCH_METRIC = "medrefine_batch_size"
PEERS_ONLY_DURATION_S = 8.0
PEERS_ONLY_MIN_REQUESTS = 100
GOALS = {"served_over_offline": 0.85, "served_over_naive": 3.0, "p99_over_p50_at_70pct": 2.5}
VERDICT_KEYS = ("ours_over_best_peer_rest", "ours_over_best_peer_grpc", "p99_ms_at_70pct_rest", "p99_ms_at_70pct_grpc")
OPTIMIZED_KEYS = ("optimized_over_fp32_offline_b1", "optimized_over_fp32_offline_b16", "optimized_heldout_dice_delta")
REQUIRED_KEYS = ("format", "created", "machine", "machine_load", "config", "offline", "naive", "served", "peers",
                 "served_over_offline", "served_over_naive", "goals", *VERDICT_KEYS, *OPTIMIZED_KEYS)


@dataclass(frozen=True)
class BenchConfig:
    """What one benchmark run measures (see ``python -m loadtest bench --help``)."""

    model: str = "default"
    artifacts: str | None = None
    backend: str = "onnxruntime"
    precision: str = "auto"  # the openvino backend's inference precision (service --precision)
    threads: int = 0  # 0: physical cores
    image_size: int = 256
    duration_s: float = 15.0
    warmup_s: float = 3.0
    offline_duration_s: float = 8.0
    offline_batch_sizes: tuple[int, ...] = (1, 4, 8, 16)
    service_concurrency: tuple[int, ...] = (1, 8, 32)
    naive_concurrency: tuple[int, ...] = (1, 4)
    open_fractions: tuple[float, ...] = (0.3, 0.5, 0.7, 0.9)
    naive_open_fractions: tuple[float, ...] = (0.5, 0.7)
    arrival: str = "poisson"
    protocols: tuple[str, ...] = ("rest", "grpc")
    primary_protocol: str = "rest"
    max_batch_size: int = ServiceSettings.max_batch_size  # ours; the peers keep PEER_MAX_BATCH_SIZE
    max_latency_ms: float = 10.0
    min_requests: int = 150
    max_step_s: float = 60.0
    request_timeout_s: float = 60.0
    startup_timeout_s: float = 300.0
    skip_naive: bool = False
    peers: tuple[str, ...] = tuple(PEERS)
    peers_only: bool = False  # our service and the peers only: no offline pipeline, no naive baseline
    optimized_results: str | None = None  # an optimisation A/B JSON (default: newest results/optimize-*.json)
    profile_s: float = 0.0  # > 0: also py-spy the service at peak and the offline pipeline (not timed steps)
    note: str = ""
    out: str | None = None

    def __post_init__(self) -> None:
        if self.primary_protocol not in self.protocols:
            raise ValueError(f"primary_protocol {self.primary_protocol!r} must be one of protocols {self.protocols}")
        unknown = [p for p in self.protocols if p not in ("rest", "oip-http", "grpc")]
        if unknown:
            raise ValueError(f"protocols {unknown} unknown; choose from rest, oip-http, grpc")
        if not 0 <= self.warmup_s < self.duration_s:
            raise ValueError(f"warmup_s must be in [0, duration_s={self.duration_s}), got {self.warmup_s}")
        unknown_peers = [p for p in self.peers if p not in PEERS]
        if unknown_peers:
            raise ValueError(f"peers {unknown_peers} unknown; choose from {sorted(PEERS)}")
        if not any(abs(f - 0.7) < 1e-9 for f in self.open_fractions):
            raise ValueError(f"open_fractions must include 0.7 (the p99/p50 goal), got {self.open_fractions}")

    def resolved_threads(self) -> int:
        from inference.engines import physical_cores

        return self.threads if self.threads > 0 else physical_cores()

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["threads"] = self.resolved_threads()
        return data


@dataclass(frozen=True)
class Target:
    """A server endpoint under load: ``url`` is ``http://127.0.0.1:P`` (HTTP) or ``127.0.0.1:P`` (gRPC)."""

    name: str
    protocol: str  # rest | oip-http | grpc
    url: str
    metrics_url: str | None = None
    server_pid: int | None = None
    labels: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- helpers


def thread_env(threads: int) -> dict[str, str]:
    """Environment that pins every math library of a child process to ``threads`` threads."""
    value = str(int(threads))
    return {"OMP_NUM_THREADS": value, "MKL_NUM_THREADS": value, "OPENBLAS_NUM_THREADS": value}


def service_command(artifacts: str | Path, *, port: int, grpc_port: int, backend: str,
                    precision: str = "auto") -> list[str]:
    return [sys.executable, "-m", "service", "--port", str(port), "--grpc-port", str(grpc_port),
            "--backend", backend, "--artifacts", str(artifacts),
            *(["--precision", precision] if precision != "auto" else [])]


def private_bentoml_home(work: str | Path) -> dict[str, str]:
    """``BENTOML_HOME`` under ``work`` for a server we start.

    BentoML keeps the Prometheus multiprocess files of every server in ``$BENTOML_HOME/
    prometheus_multiproc_dir`` and empties that directory whenever any ``bentoml serve`` starts, so
    another BentoML server starting on the same machine (another test run, another user) would zero
    the ``/metrics`` of the server under test in the middle of a measurement.
    """
    home = Path(work) / "bentoml_home"
    home.mkdir(parents=True, exist_ok=True)
    return {"BENTOML_HOME": str(home)}


def _scrape_histogram(metrics_url: str | None) -> Any:
    if metrics_url is None:
        return None
    try:
        response = httpx.get(metrics_url, timeout=10.0)
    except httpx.TransportError:
        return None
    if response.status_code != 200:
        return None
    return parse_histogram(response.text, BATCH_METRIC)


def run_step(target: Target, spec: LoadSpec, workload: Workload, *, timeout_s: float = 60.0) -> dict[str, Any]:
    """One load step against ``target``: the summary plus CPU use and the step's batch-size distribution."""
    before = _scrape_histogram(target.metrics_url)
    cpu = CpuAccount(target.server_pid)
    snap = cpu.snapshot()
    if target.protocol == "grpc":
        run = asyncio.run(run_grpc_load(target.url, spec, workload, timeout_s=timeout_s))
    else:
        run = asyncio.run(run_http_load(target.url, target.protocol, spec, workload, timeout_s=timeout_s))
    cpu_use = CpuAccount.delta(snap, cpu.snapshot())
    after = _scrape_histogram(target.metrics_url)
    summary = run.summary()
    summary["cpu"] = cpu_use
    summary["throughput_per_server_core"] = (
        summary["throughput_rps"] / cpu_use["server_cores"] if cpu_use["server_cores"] > 0 else None)
    summary["batch_size_distribution"] = (
        (after - before).distribution() if before is not None and after is not None else None)
    _log(f"  {target.name:14s} {spec.mode:6s} "
         + (f"c={spec.concurrency:<3d}" if spec.mode == "closed" else f"r={spec.rate_rps:<6.1f}")
         + f" -> {summary['throughput_rps']:7.2f} rps  p50 {_ms(summary['p50_ms'])}  p99 {_ms(summary['p99_ms'])}"
         + f"  err {summary['errors']}  server {cpu_use['server_cores']:.2f} loader {cpu_use['loader_cores']:.2f} "
         + f"other {cpu_use['other_cores']:.2f} cores"
         + (f"  mean batch {summary['batch_size_distribution']['mean']:.1f}"
            if summary["batch_size_distribution"] and summary["batch_size_distribution"]["mean"] else ""))
    return summary


def find_peak(steps: Sequence[dict[str, Any]], *, max_error_rate: float = 0.01) -> dict[str, Any] | None:
    """The closed-loop step with the highest throughput among those with error rate <= ``max_error_rate``."""
    clean = [s for s in steps if s["error_rate"] <= max_error_rate and s["ok"] > 0]
    return max(clean, key=lambda s: s["throughput_rps"]) if clean else None


def load_curve(target: Target, config: BenchConfig, workload: Workload, *, concurrencies: Sequence[int],
               fractions: Sequence[float]) -> dict[str, Any]:
    """Closed-loop peak search, then open-loop steps at ``fractions`` of the peak."""
    if config.warmup_s > 0:  # first large batches allocate engine memory; keep that out of every step
        warm = LoadSpec(mode="closed", concurrency=max(concurrencies), duration_s=config.warmup_s)
        run_step(target, warm, workload, timeout_s=config.request_timeout_s)
    closed = [
        run_step(target, LoadSpec(mode="closed", concurrency=c, duration_s=config.duration_s,
                                  warmup_s=config.warmup_s), workload, timeout_s=config.request_timeout_s)
        for c in concurrencies
    ]
    peak = find_peak(closed)
    curve: dict[str, Any] = {"protocol": target.protocol, "closed": closed, "open": [], **target.labels}
    if peak is None:
        curve.update(peak_throughput_rps=0.0, peak_concurrency=None)
        return curve
    curve.update(peak_throughput_rps=peak["throughput_rps"], peak_concurrency=peak["concurrency"],
                 peak_p50_ms=peak["p50_ms"], peak_p99_ms=peak["p99_ms"],
                 peak_throughput_per_server_core=peak["throughput_per_server_core"])
    for index, fraction in enumerate(fractions):
        rate = fraction * peak["throughput_rps"]
        # long enough for min_requests answers after warm-up (percentiles need samples), at most max_step_s
        duration = min(max(config.duration_s, config.warmup_s + config.min_requests / rate), config.max_step_s)
        spec = LoadSpec(mode="open", rate_rps=rate, arrival=config.arrival, duration_s=duration,
                        warmup_s=config.warmup_s, seed=index, max_inflight=256)
        step = run_step(target, spec, workload, timeout_s=config.request_timeout_s)
        step["fraction_of_peak"] = fraction
        curve["open"].append(step)
    at70 = next((s for s in curve["open"] if abs(s["fraction_of_peak"] - 0.7) < 1e-9), None)
    if at70 is not None:
        curve["at_70pct"] = {
            "offered_rps": at70["offered_rps"], "throughput_rps": at70["throughput_rps"],
            "p50_ms": at70["p50_ms"], "p95_ms": at70["p95_ms"], "p99_ms": at70["p99_ms"],
            "p99_over_p50": (at70["p99_ms"] / at70["p50_ms"]) if at70["p50_ms"] else None,
            "error_rate": at70["error_rate"],
        }
    return curve


# ---------------------------------------------------------------------------------------------- offline


def offline_throughput(art_dir: str | Path, *, batch_sizes: Sequence[int], threads: int, duration_s: float,
                       image_size: int, backend: str = "onnxruntime", precision: str = "auto") -> dict[str, Any]:
    """Images per second of ``SegmentationPipeline.segment`` at each batch size (no server, no decoding).

    Run it in a process whose ``OMP_NUM_THREADS`` is ``threads`` (``python -m loadtest offline``).
    Each batch size: two warm-up calls, then calls on distinct images for at least ``duration_s`` and
    3 calls. Returns ``{"<b>": {"throughput_ips", "batch_latency_p50_ms", "batch_latency_p99_ms", "calls"}}``.
    """
    import torch

    from inference.pipeline import SegmentationPipeline
    from loadtest.stats import percentile

    torch.set_num_threads(threads)
    engine_opts = {"precision": precision} if precision != "auto" else {}  # as service.runtime.engine_options
    pipeline = SegmentationPipeline.from_artifacts(art_dir, backend=backend, intra_op_threads=threads, **engine_opts)
    workload = Workload(size=image_size, pool_size=max(64, 2 * max(batch_sizes)))
    pool = [workload.float_image(i) for i in range(workload.pool_size)]
    results: dict[str, Any] = {}
    cursor = 0
    for b in batch_sizes:
        for _ in range(2):
            pipeline.segment([pool[(cursor + k) % len(pool)] for k in range(b)])
            cursor += b
        times: list[float] = []
        started = time.perf_counter()
        cpu_started = time.process_time()
        while time.perf_counter() - started < duration_s or len(times) < 3:
            images = [pool[(cursor + k) % len(pool)] for k in range(b)]
            cursor += b
            t = time.perf_counter()
            pipeline.segment(images)
            times.append(time.perf_counter() - t)
        cpu_s = time.process_time() - cpu_started
        row = {
            "throughput_ips": b * len(times) / sum(times),
            "batch_latency_p50_ms": 1000.0 * percentile(times, 50),
            "batch_latency_p99_ms": 1000.0 * percentile(times, 99),
            "calls": len(times),
            "cores_used": cpu_s / (time.perf_counter() - started),
            "images_per_cpu_s": b * len(times) / cpu_s if cpu_s > 0 else None,
        }
        results[str(b)] = row
        _log(f"  offline batch {b:3d}: {row['throughput_ips']:.2f} images/s (p50 {row['batch_latency_p50_ms']:.1f} ms "
             f"per call, {row['cores_used']:.2f} cores busy)")
    results["engine"] = pipeline.engine.describe()
    results["torch_threads"] = torch.get_num_threads()
    return results


def _profile_offline(config: BenchConfig, art_dir: Path, raw_out: Path) -> dict[str, Any] | None:
    """py-spy the offline pipeline at the service's max batch size for ``profile_s`` seconds."""
    from loadtest.profile import py_spy_available, record_command, summarise_collapsed

    if py_spy_available() is None:
        return None
    threads = config.resolved_threads()
    child = [sys.executable, "-m", "loadtest", "offline", "--artifacts", str(art_dir), "--threads", str(threads),
             "--batch-sizes", str(config.max_batch_size), "--duration-s", str(config.profile_s),
             "--image-size", str(config.image_size), "--backend", config.backend, "--precision", config.precision,
             "--json-out", os.devnull]
    done = subprocess.run(record_command(raw_out, duration_s=config.profile_s, command=child), cwd=REPO_ROOT,
                          env={**os.environ, **thread_env(threads)}, capture_output=True, text=True)
    if done.returncode != 0 or not raw_out.is_file():
        _log(f"  py-spy of the offline pipeline failed: {done.stderr[-500:]}")
        return None
    return summarise_collapsed(raw_out.read_text())


def _profile_service(config: BenchConfig, target: Target, concurrency: int, workload: Workload,
                     raw_out: Path) -> dict[str, Any] | None:
    """py-spy the service's process tree during a closed-loop step at ``concurrency`` (not a timed step)."""
    from loadtest.profile import py_spy_available, start_recording, summarise_collapsed

    if py_spy_available() is None or target.server_pid is None:
        return None
    recorder = start_recording(target.server_pid, raw_out, config.profile_s)
    step = run_step(target, LoadSpec(mode="closed", concurrency=concurrency, duration_s=config.profile_s + 1.0),
                    workload, timeout_s=config.request_timeout_s)
    _, err = recorder.communicate(timeout=config.profile_s + 60)
    if recorder.returncode != 0 or not raw_out.is_file():
        _log(f"  py-spy of the service failed: {err.decode(errors='replace')[-500:]}")
        return None
    summary = summarise_collapsed(raw_out.read_text())
    summary["throughput_rps_while_profiled"] = step["throughput_rps"]
    return summary


def _run_offline_child(config: BenchConfig, art_dir: Path, work: Path) -> dict[str, Any]:
    threads = config.resolved_threads()
    sizes = sorted(set(config.offline_batch_sizes) | {config.max_batch_size})
    out = work / "offline.json"
    cmd = [sys.executable, "-m", "loadtest", "offline", "--artifacts", str(art_dir), "--threads", str(threads),
           "--batch-sizes", ",".join(map(str, sizes)), "--duration-s", str(config.offline_duration_s),
           "--image-size", str(config.image_size), "--backend", config.backend, "--precision", config.precision,
             "--json-out", str(out)]
    cpu = CpuAccount(None)
    snap = cpu.snapshot()
    child = subprocess.run(cmd, cwd=REPO_ROOT, env={**os.environ, **thread_env(threads)}, capture_output=True,
                           text=True)
    sys.stderr.write(child.stderr)
    if child.returncode != 0:
        raise RuntimeError(f"offline benchmark failed (exit {child.returncode}): {' '.join(cmd)}")
    result = json.loads(out.read_text())
    result["machine_cores_busy"] = CpuAccount.delta(snap, cpu.snapshot())["machine_cores"]
    return result


# ---------------------------------------------------------------------------------------------- artifacts


def prepare_artifacts(model: str, artifacts: str | None, work: Path) -> tuple[Path, str]:
    """The artifact directory to serve and the run directory ``model`` (exported into ``work`` when
    ``artifacts`` is None).

    Raises:
        FileNotFoundError: naming the missing run directory or manifest.
        RuntimeError: the export failed (its stderr tail included).
    """
    from weights.checkpoints import resolve_run_dir

    run_dir = resolve_run_dir(model)
    if artifacts is not None:
        art = Path(artifacts)
        if not (art / "manifest.json").is_file():
            raise FileNotFoundError(f"--artifacts {art}: no manifest.json (export with python -m export onnx)")
        return art, str(run_dir)
    if not (run_dir / "run.json").is_file():
        raise FileNotFoundError(f"--model {model}: {run_dir}/run.json not found; train the default models "
                                "(make default-models) or pass --model RUN_DIR / --artifacts ART_DIR")
    art = work / "artifacts"
    _log(f"exporting {run_dir} -> {art}")
    export = subprocess.run([sys.executable, "-m", "export", "onnx", "--model", str(run_dir), "--out", str(art)],
                            cwd=REPO_ROOT, capture_output=True, text=True)
    if export.returncode != 0:
        raise RuntimeError(f"python -m export onnx --model {run_dir} failed (exit {export.returncode}):\n"
                           f"{export.stderr[-2000:]}")
    return art, str(run_dir)


# ---------------------------------------------------------------------------------------------- results


def served_ratios(curve: dict[str, Any], offline: dict[str, Any], naive_peak: float | None,
                  batch_size: int) -> dict[str, Any]:
    """Served peak throughput over offline throughput at ``batch_size`` and over the naive peak."""
    served = curve.get("peak_throughput_rps") or 0.0
    per_core = curve.get("peak_throughput_per_server_core")
    offline_row = offline.get(str(batch_size)) or {}
    offline_at = offline_row.get("throughput_ips")
    offline_per_core = offline_row.get("images_per_cpu_s")
    return {
        "served_peak_rps": served,
        "offline_ips_at_max_batch": offline_at,
        "matching_batch_size": batch_size,
        "served_over_offline": served / offline_at if offline_at else None,
        # CPU-normalised (requests per server CPU-second over images per offline CPU-second): robust to
        # other tenants taking a different share of the machine during the two measurements
        "served_over_offline_per_core": per_core / offline_per_core if per_core and offline_per_core else None,
        "naive_peak_rps": naive_peak,
        "served_over_naive": served / naive_peak if naive_peak else None,
    }


def _goals(served_over_offline: float | None, served_over_naive: float | None, served: dict[str, Any],
           per_core: float | None = None) -> dict[str, Any]:
    ratios = {p: (c.get("at_70pct") or {}).get("p99_over_p50") for p, c in served.items() if isinstance(c, dict)
              and "protocol" in c}
    known = [v for v in ratios.values() if v is not None]
    return {
        "served_over_offline": {"target": f">= {GOALS['served_over_offline']}", "value": served_over_offline,
                                "met": served_over_offline is not None
                                and served_over_offline >= GOALS["served_over_offline"],
                                "value_cpu_normalised": per_core},
        "served_over_naive": {"target": f">= {GOALS['served_over_naive']}", "value": served_over_naive,
                              "met": served_over_naive is not None and served_over_naive >= GOALS["served_over_naive"]},
        "p99_over_p50_at_70pct": {"target": f"<= {GOALS['p99_over_p50_at_70pct']}", "by_protocol": ratios,
                                  "met": bool(known) and all(v <= GOALS["p99_over_p50_at_70pct"] for v in known)},
    }


def validate_results(data: dict[str, Any]) -> None:
    """Raise ValueError naming the first missing or mistyped key of a results document."""
    for key in REQUIRED_KEYS:
        if key not in data:
            raise ValueError(f"results: missing top-level key {key!r}")
    if data["format"] != RESULTS_FORMAT:
        raise ValueError(f"results: format {data['format']!r}, expected {RESULTS_FORMAT!r}")
    for key in ("served_over_offline", "served_over_naive", *VERDICT_KEYS, *OPTIMIZED_KEYS):
        if data[key] is not None and not isinstance(data[key], (int, float)):
            raise ValueError(f"results: {key} must be a number or null, got {data[key]!r}")
    for name, curve in data["served"].items():
        if name == "settings":
            continue
        for kind in ("closed", "open"):
            for step in curve[kind]:
                for k in ("throughput_rps", "p50_ms", "p95_ms", "p99_ms", "error_rate", "batch_size_distribution",
                          "cpu"):
                    if k not in step:
                        raise ValueError(f"results: served.{name}.{kind} step lacks {k!r}")


def _plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [(f"service {name}", c) for name, c in data["served"].items() if name != "settings"]
    if data["naive"].get("closed"):
        curves.append(("naive rest", data["naive"]))
    fig, axes = plt.subplots(1, len(curves), figsize=(5.2 * len(curves), 4.2), squeeze=False)
    for ax, (title, curve) in zip(axes[0], curves, strict=True):
        open_steps = sorted(curve.get("open", []), key=lambda s: s["offered_rps"] or 0.0)
        x = [s["offered_rps"] for s in open_steps]
        for key, style in (("p50_ms", "o-"), ("p95_ms", "s--"), ("p99_ms", "^-")):
            ax.plot(x, [s[key] for s in open_steps], style, label=f"{key[:3]} open loop")
        closed = sorted(curve.get("closed", []), key=lambda s: s["throughput_rps"])
        ax.plot([s["throughput_rps"] for s in closed], [s["p99_ms"] for s in closed], "x:", color="grey",
                label="p99 closed loop (x = achieved)")
        if curve.get("peak_throughput_rps"):
            ax.axvline(curve["peak_throughput_rps"], color="k", lw=0.8, ls=":")
            ax.axvline(0.7 * curve["peak_throughput_rps"], color="r", lw=0.8, ls=":")
        ax.set_title(f"{title} (peak {curve.get('peak_throughput_rps') or 0:.1f} rps)")
        ax.set_xlabel("offered load (requests/s)")
        ax.set_ylabel("latency (ms)")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    machine = data["machine"]
    fig.suptitle(f"medrefine latency vs offered load — {machine['cpu_model']}, {machine['logical_cores']} cores, "
                 f"threads={data['config']['threads']}, {data['created'][:16]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _ms(value: float | None) -> str:
    return f"{value:8.1f} ms" if value is not None else "     n/a   "


# ---------------------------------------------------------------------------------------------- main


def run_bench(config: BenchConfig) -> tuple[dict[str, Any], Path]:
    """Run every step of the benchmark; returns the results and the JSON path written."""
    started = time.perf_counter()
    threads = config.resolved_threads()
    machine = {**machine_description(), "instruction_sets": instruction_sets()}
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    out = Path(config.out) if config.out else RESULTS_DIR / (
        f"{machine_slug(machine)}-{_dt.datetime.now().strftime('%Y%m%d-%H%M')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    workload = Workload(size=config.image_size)
    loads: list[float] = [os.getloadavg()[0]]
    tenants = {"start": busiest_processes()}
    with tempfile.TemporaryDirectory(prefix="medrefine-bench-") as tmp:
        work = Path(tmp)
        art_dir, run_dir = prepare_artifacts(config.model, config.artifacts, work)
        manifest = json.loads((art_dir / "manifest.json").read_text())

        # 1. Offline pipeline throughput
        offline: dict[str, Any] = {}
        if not config.peers_only:
            _log(f"1. offline pipeline throughput ({config.backend}, {threads} threads)")
            offline = _run_offline_child(config, art_dir, work)
            if config.profile_s > 0:
                offline["profile"] = _profile_offline(config, art_dir, work / "profile-offline.txt")
            loads.append(os.getloadavg()[0])

        # 2. Naive baseline
        naive: dict[str, Any] = {"closed": [], "open": [], "peak_throughput_rps": None}
        if not (config.skip_naive or config.peers_only):
            _log("2. naive baseline (torch eager, one request at a time)")
            port = free_port()
            server = ServerProcess(
                [sys.executable, "-m", "loadtest.naive_server", "--model", run_dir, "--port", str(port),
                 "--threads", str(threads)],
                ready_url=f"http://127.0.0.1:{port}/healthz", env=thread_env(threads),
                log_path=work / "naive.log", startup_timeout_s=config.startup_timeout_s, name="naive server")
            with server:
                target = Target("naive-rest", "rest", f"http://127.0.0.1:{port}", None, server.pid)
                naive = load_curve(target, config, workload, concurrencies=config.naive_concurrency,
                                   fractions=config.naive_open_fractions)
                naive["startup_s"] = server.startup_s
            loads.append(os.getloadavg()[0])

        # 3. The service
        _log(
            f"3. service ({config.backend}, max batch {config.max_batch_size}, max latency {config.max_latency_ms} ms)"
        )
        port, grpc_port = free_port(), free_port()
        settings_env = {
            **thread_env(threads),
            **private_bentoml_home(work),
            "MEDREFINE_INTRA_OP_THREADS": str(threads),
            "MEDREFINE_MAX_BATCH_SIZE": str(config.max_batch_size),
            "MEDREFINE_MAX_LATENCY_MS": str(config.max_latency_ms),
            "MEDREFINE_REQUEST_TIMEOUT_S": str(config.request_timeout_s),
        }
        server = ServerProcess(service_command(art_dir, port=port, grpc_port=grpc_port, backend=config.backend,
                                                   precision=config.precision),
                               ready_url=f"http://127.0.0.1:{port}/readyz", env=settings_env,
                               log_path=work / "service.log", startup_timeout_s=config.startup_timeout_s,
                               name="service")
        served: dict[str, Any] = {"settings": {k: v for k, v in settings_env.items() if k.startswith("MEDREFINE_")}}
        with server:
            served["settings"]["startup_s"] = server.startup_s
            for protocol in config.protocols:
                url = f"127.0.0.1:{grpc_port}" if protocol == "grpc" else f"http://127.0.0.1:{port}"
                target = Target(f"service-{protocol}", protocol, url, f"http://127.0.0.1:{port}/metrics", server.pid)
                served[protocol] = load_curve(target, config, workload, concurrencies=config.service_concurrency,
                                              fractions=config.open_fractions)
                if config.profile_s > 0 and served[protocol].get("peak_concurrency"):
                    raw = work / f"profile-service-{protocol}.txt"
                    served[protocol]["profile"] = _profile_service(
                        config, target, served[protocol]["peak_concurrency"], workload, raw)
                loads.append(os.getloadavg()[0])
            service_log_tail = server.log_tail(20)

        # 4. The peers
        peers: dict[str, Any] = {}
        for index, name in enumerate(config.peers, start=1):
            _log(f"4.{index} peer {name}")
            peers[name] = _peer_curves(config, name, art_dir, work, workload)
            loads.append(os.getloadavg()[0])
    tenants["end"] = busiest_processes()
    data = assemble_results(config, machine=machine, created=created, offline=offline, naive=naive, served=served,
                            manifest=manifest, run_dir=run_dir, loads=loads, workload_pool=workload.pool_size,
                            duration_s=time.perf_counter() - started, service_log_tail=service_log_tail,
                            peers=peers, tenants=tenants)
    return data, write_results(data, out)


def _peer_curves(config: BenchConfig, name: str, art_dir: Path, work: Path, workload: Workload) -> dict[str, Any]:
    """Peer ``name`` started over ``art_dir``, a :func:`load_curve` per protocol it serves, then stopped."""
    threads = config.resolved_threads()
    peer = launch_peer(name, art_dir, threads=threads, max_batch_size=PEER_MAX_BATCH_SIZE, work=work,
                       thread_env=thread_env(threads), startup_timeout_s=config.startup_timeout_s, log=_log)
    result: dict[str, Any] = {"details": peer.details, "curves": {}}
    with peer.server as server:
        result["startup_s"] = server.startup_s
        for protocol, url in peer.urls.items():
            target = Target(f"{name}-{protocol}", protocol, url, None, server.pid)
            curve = load_curve(target, config, workload, concurrencies=config.service_concurrency,
                               fractions=config.open_fractions)
            if config.profile_s > 0 and curve.get("peak_concurrency"):  # where a peer's CPU goes, as for ours
                curve["profile"] = _profile_service(config, target, curve["peak_concurrency"], workload,
                                                    work / f"profile-{name}-{protocol}.txt")
            result["curves"][protocol] = curve
        result["log_tail"] = server.log_tail(10)
    return result


def optimized_figures(path: str | Path | None = None) -> dict[str, Any]:
    """The optimisation A/B's verdict keys (:data:`OPTIMIZED_KEYS`) from ``path`` or, when None, from the
    newest ``loadtest/results/optimize-*.json`` (by its ``created`` field, then name); nulls when none exists.

    Raises:
        ValueError: ``path`` is given but missing or not a JSON object.
    """
    if path is None:
        found = []
        for candidate in RESULTS_DIR.glob("optimize-*.json"):
            try:
                doc = json.loads(candidate.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if isinstance(doc, dict):
                found.append((str(doc.get("created", "")), candidate.name, candidate, doc))
        if not found:
            return {"source": None, "note": "no loadtest/results/optimize-*.json yet", **dict.fromkeys(OPTIMIZED_KEYS)}
        _, _, source, doc = max(found, key=lambda row: row[:2])
    else:
        source = Path(path)
        try:
            doc = json.loads(source.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"--optimized-results {source}: {exc}") from None
        if not isinstance(doc, dict):
            raise ValueError(f"--optimized-results {source}: expected a JSON object")
    return {"source": source.name, "created": doc.get("created"), **{k: doc.get(k) for k in OPTIMIZED_KEYS}}


def assemble_results(config: BenchConfig, *, machine: dict[str, Any], created: str, offline: dict[str, Any],
                     naive: dict[str, Any], served: dict[str, Any], manifest: dict[str, Any], run_dir: str,
                     loads: Sequence[float], workload_pool: int, duration_s: float,
                     service_log_tail: str = "", peers: dict[str, Any] | None = None,
                     tenants: dict[str, Any] | None = None) -> dict[str, Any]:
    """The results document (schema ``medrefine-loadtest/1``) from the measured parts.

    ``served`` maps each protocol to its :func:`load_curve` (plus ``"settings"``); the top-level
    ``served_over_offline`` and ``served_over_naive`` are those of ``config.primary_protocol``; ``peers``
    maps each peer to ``{"curves": {protocol: curve}, ...}`` (see :mod:`loadtest.peers.compare`).
    """
    threads = config.resolved_threads()
    peers = peers or {}
    peer_curves = [c for peer in peers.values() for c in peer.get("curves", {}).values()]
    other_cores = [step["cpu"]["other_cores"]
                   for curve in [naive, *[c for k, c in served.items() if k != "settings"], *peer_curves]
                   for step in curve.get("closed", []) + curve.get("open", [])]
    naive_peak = naive.get("peak_throughput_rps")
    ratios = {p: served_ratios(served[p], offline, naive_peak, config.max_batch_size) for p in config.protocols}
    primary = ratios[config.primary_protocol]
    other_mean = sum(other_cores) / len(other_cores) if other_cores else 0.0
    data = {
        "format": RESULTS_FORMAT,
        "created": created,
        "machine": machine,
        "machine_load": {
            "loadavg_1min_by_phase": list(loads),
            "other_tenants_cores_mean": other_mean,
            "other_tenants_cores_max": max(other_cores) if other_cores else 0.0,
            "shared": other_mean > 0.25,
            "note": config.note or ("other processes used on average "
                                    f"{other_mean:.2f} of {machine['logical_cores']} cores during the load steps"),
            "busiest_other_processes": tenants or {},
        },
        "config": config.to_dict(),
        "threads": {"OMP_NUM_THREADS": threads, "ort_intra_op_threads": threads, "torch_threads": threads,
                    "load_generator": "one asyncio process (httpx / tritonclient.grpc.aio)"},
        "model": {"run_dir": run_dir, "artifacts_version": manifest.get("version"),
                  "precision": manifest.get("precision"), "pipeline": manifest.get("pipeline")},
        "workload": {"image": f"{config.image_size}x{config.image_size} uint8 breast-ultrasound phantom",
                     "distinct_images": workload_pool, "rest_payload": "multipart PNG (field 'file')",
                     "grpc_payload": "IMAGE UINT8 [H, W] raw"},
        "offline": offline,
        "naive": naive,
        "served": served,
        "primary_protocol": config.primary_protocol,
        "served_over_offline": primary["served_over_offline"],
        "served_over_naive": primary["served_over_naive"],
        "ratios": ratios,
        "goals": _goals(primary["served_over_offline"], primary["served_over_naive"], served,
                        primary["served_over_offline_per_core"]),
        "service_log_tail": service_log_tail,
        "duration_s": duration_s,
        "peers": peers,
    }
    compared = verdict(data)
    data.update({key: compared[key] for key in VERDICT_KEYS})
    data["comparison"] = {"servers": compared["servers"], "best_peer": compared["best_peer"]}
    data["goals"]["ours_over_best_peer"] = {**compared["goal"],
                                            "met": all(g["met"] for g in compared["goal"].values())}
    optimized = optimized_figures(config.optimized_results)
    data.update({key: optimized[key] for key in OPTIMIZED_KEYS})
    data["optimized"] = optimized
    return data


def write_results(data: dict[str, Any], out: str | Path) -> Path:
    """Validate ``data``, write it and its plot (``out`` with ``.png``); refresh ``latest.*`` in results/."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot = out.with_suffix(".png")
    _plot(data, plot)
    data["plot"] = plot.name
    servers_plot = plot_servers(data, out.with_name(f"{out.stem}-servers.png"))
    data["plot_servers"] = servers_plot.name
    validate_results(data)
    text = json.dumps(data, indent=2, default=_json_default)
    out.write_text(text)
    if out.parent.resolve() == RESULTS_DIR.resolve() and not data["config"].get("peers_only"):
        (RESULTS_DIR / "latest.json").write_text(text)
        shutil.copyfile(plot, RESULTS_DIR / "latest.png")
        shutil.copyfile(servers_plot, RESULTS_DIR / "latest-servers.png")
    return out


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(",") if v.strip())


def _config_from_args(args: argparse.Namespace) -> BenchConfig:
    return BenchConfig(
        model=args.model,
        artifacts=args.artifacts,
        backend=args.backend,
        precision=args.precision,
        threads=args.threads,
        image_size=args.image_size,
        duration_s=args.duration_s
        if args.duration_s is not None
        else (PEERS_ONLY_DURATION_S if args.peers_only else BenchConfig.duration_s),
        warmup_s=args.warmup_s,
        min_requests=args.min_requests
        if args.min_requests is not None
        else (PEERS_ONLY_MIN_REQUESTS if args.peers_only else BenchConfig.min_requests),
        max_step_s=args.max_step_s,
        offline_duration_s=args.offline_duration_s,
        offline_batch_sizes=args.offline_batch_sizes,
        service_concurrency=args.concurrency,
        naive_concurrency=args.naive_concurrency,
        open_fractions=args.fractions,
        arrival=args.arrival,
        protocols=args.protocols,
        primary_protocol=args.primary_protocol,
        max_batch_size=args.max_batch_size,
        max_latency_ms=args.max_latency_ms,
        skip_naive=args.skip_naive,
        profile_s=args.profile_s,
        note=args.note,
        peers=args.peers,
        peers_only=args.peers_only,
        optimized_results=args.optimized_results,
        out=args.out,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = BenchConfig()
    parser.add_argument("--model", default=d.model, help="run directory (naive baseline; exported when no --artifacts)")
    parser.add_argument("--artifacts", default=None, help="artifact directory to serve (default: export --model)")
    parser.add_argument("--backend", default=d.backend, choices=("onnxruntime", "openvino", "torch", "tensorrt"))
    parser.add_argument("--precision", default=d.precision, choices=("auto", "fp32", "bf16"),
                        help="the openvino backend's inference precision (auto: its default)")
    parser.add_argument("--threads", type=int, default=d.threads, help="threads per engine (0: physical cores)")
    parser.add_argument("--image-size", type=int, default=d.image_size)
    parser.add_argument(
        "--duration-s",
        type=float,
        default=None,
        help=f"seconds per load step (default {d.duration_s}; {PEERS_ONLY_DURATION_S} with --peers-only)",
    )
    parser.add_argument("--warmup-s", type=float, default=d.warmup_s, help="left out of each step's summary")
    parser.add_argument("--min-requests", type=int, default=None,
                        help=f"open-loop steps last until this many requests were offered after warm-up "
                             f"(default {d.min_requests}; {PEERS_ONLY_MIN_REQUESTS} with --peers-only) ...")
    parser.add_argument("--max-step-s", type=float, default=d.max_step_s, help="... but at most this long")
    parser.add_argument("--offline-duration-s", type=float, default=d.offline_duration_s)
    parser.add_argument("--offline-batch-sizes", type=_ints, default=d.offline_batch_sizes)
    parser.add_argument("--concurrency", type=_ints, default=d.service_concurrency,
                        help="closed-loop concurrencies for the service's peak search")
    parser.add_argument("--naive-concurrency", type=_ints, default=d.naive_concurrency)
    parser.add_argument("--fractions", type=_floats, default=d.open_fractions,
                        help="open-loop offered loads as fractions of peak (must include 0.7)")
    parser.add_argument("--arrival", default=d.arrival, choices=("poisson", "fixed"))
    parser.add_argument("--protocols", type=lambda s: tuple(s.split(",")), default=d.protocols)
    parser.add_argument("--primary-protocol", default=d.primary_protocol)
    parser.add_argument("--max-batch-size", type=int, default=d.max_batch_size)
    parser.add_argument("--max-latency-ms", type=float, default=d.max_latency_ms)
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--peers", type=lambda s: tuple(v for v in s.split(",") if v), default=d.peers,
                        help=f"comma-separated peers to compare (default all: {','.join(PEERS)}; '' for none)")
    parser.add_argument("--peers-only", action="store_true",
                        help="only our service and the peers (no offline pipeline, no naive baseline), shorter steps")
    parser.add_argument("--optimized-results", default=None,
                        help="optimisation A/B JSON to copy the optimized_* keys from "
                             "(default: the newest loadtest/results/optimize-*.json)")
    parser.add_argument("--profile-s", type=float, default=0.0,
                        help="> 0: py-spy the service at peak and the offline pipeline for this long (extra steps)")
    parser.add_argument("--note", default="", help="free text stored in machine_load.note (e.g. 'shared box')")
    parser.add_argument("--out", default=None, help="results JSON (default loadtest/results/<machine>-<date>.json)")


def run(args: argparse.Namespace) -> int:
    try:
        config = _config_from_args(args)
    except ValueError as exc:
        print(f"python -m loadtest bench: {exc}", file=sys.stderr)
        return 2
    # SIGTERM unwinds like Ctrl-C, so every server this run started is stopped (each in its own session)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    data, out = run_bench(config)
    goals = data["goals"]
    print(json.dumps({
        "results": str(out),
        "served_over_offline": data["served_over_offline"],
        "served_over_naive": data["served_over_naive"],
        "p99_over_p50_at_70pct": goals["p99_over_p50_at_70pct"]["by_protocol"],
        "goals_met": {k: v["met"] for k, v in goals.items()},
        **{key: data[key] for key in (*VERDICT_KEYS, *OPTIMIZED_KEYS)},
        "best_peer": data["comparison"]["best_peer"],
        "other_tenants_cores_mean": data["machine_load"]["other_tenants_cores_mean"],
    }, indent=2))
    return 0
