"""A queueing model of medrefine replicas, checked against loadtest/scaleout.py's measurements, then used
to size a fleet: replicas needed for 100, 1,000 and 10,000 images/s at p99 < 200 ms.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.stats import percentile

__all__ = ["ReplicaModel", "fleet_size", "simulate_closed", "simulate_open"]

P99_TARGET_MS = 200.0
TARGETS_IPS = (100.0, 1_000.0, 10_000.0)


@dataclass(frozen=True)
class ReplicaModel:
    """Per-request times in seconds, sampled together: ``delay_s[i]`` then ``service_s[i]`` in the queue.

    Args:
        delay_s: (M,) time outside the inference queue (no queueing there).
        service_s: (M,) time holding the replica's one inference thread.
    """

    delay_s: np.ndarray
    service_s: np.ndarray

    @classmethod
    def from_layout(cls, layout: dict[str, Any]) -> ReplicaModel:
        """Calibrate on a layout of the scaleout JSON: its c=1 latencies and its peak throughput only."""
        one = next(s for s in layout["closed"] if s["concurrency"] == 1)
        latencies = np.asarray(one["latencies_ms"], dtype=np.float64) / 1000.0
        if latencies.size < 20:
            raise ValueError(f"layout: c=1 step has {latencies.size} latencies; need >= 20")
        service_mean = layout["replicas"] / layout["peak_throughput_rps"]
        share = min(service_mean / latencies.mean(), 1.0)
        return cls(delay_s=latencies * (1.0 - share), service_s=latencies * share)

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        index = rng.integers(0, self.service_s.size, n)
        return self.delay_s[index], self.service_s[index]

    def scaled(self, service_factor: float, delay_factor: float = 1.0) -> ReplicaModel:
        return ReplicaModel(self.delay_s * delay_factor, self.service_s * service_factor)


def simulate_closed(model: ReplicaModel, *, replicas: int, clients: int, requests: int = 20_000,
                    seed: int = 0) -> dict[str, float]:
    """``clients`` users each sending again on every answer, round robin over ``replicas`` FIFO queues."""
    rng = np.random.default_rng(seed)
    delay, service = model.sample(rng, requests)
    free_at = [0.0] * replicas
    events = [(0.0, c) for c in range(clients)]  # (time the client sends, client)
    heapq.heapify(events)
    latencies, ends = [], []
    for n in range(requests):
        sent, client = heapq.heappop(events)
        replica = n % replicas
        start = max(sent + delay[n], free_at[replica])
        free_at[replica] = end = start + service[n]
        latencies.append(end - sent)
        ends.append(end)
        heapq.heappush(events, (end, client))
    warm = requests // 10  # leave the start-up transient out
    span = max(ends) - sorted(ends)[warm]
    # completions after the first one counted, over the time from it to the last
    return {"throughput_rps": (requests - warm - 1) / span, "p50_ms": 1000 * percentile(latencies[warm:], 50),
            "p99_ms": 1000 * percentile(latencies[warm:], 99)}


def simulate_open(model: ReplicaModel, *, replicas: int, rate_rps: float, requests: int = 40_000,
                  seed: int = 0) -> dict[str, float]:
    """Poisson arrivals at ``rate_rps`` round robin over ``replicas``: one replica sees every N-th arrival,
    so its gaps are Gamma(N, 1 / rate) (Lindley's recursion on that one queue; replicas are alike)."""
    rng = np.random.default_rng(seed)
    delay, service = model.sample(rng, requests)
    gaps = rng.gamma(replicas, 1.0 / rate_rps, requests)
    arrive = np.cumsum(gaps) + delay  # reaches the inference queue after its delay
    order = np.argsort(arrive, kind="stable")
    free_at, latencies = 0.0, np.empty(requests)
    for i in order:
        start = max(arrive[i], free_at)
        free_at = start + service[i]
        latencies[i] = free_at - (arrive[i] - delay[i])
    kept = latencies[requests // 10:]
    utilisation = rate_rps / replicas * float(service.mean())
    return {"p50_ms": 1000 * float(np.percentile(kept, 50)), "p99_ms": 1000 * float(np.percentile(kept, 99)),
            "utilisation": utilisation}


def fleet_size(model: ReplicaModel, rate_rps: float, *, p99_ms: float = P99_TARGET_MS) -> dict[str, Any]:
    """The fewest replicas whose simulated p99 at ``rate_rps`` stays under ``p99_ms`` (round robin)."""
    replicas = max(1, math.ceil(rate_rps * float(model.service_s.mean()) / 0.95))  # below 95 % busy at least
    while True:
        result = simulate_open(model, replicas=replicas, rate_rps=rate_rps)
        if result["p99_ms"] < p99_ms:
            return {"replicas": replicas, **result}
        replicas = max(replicas + 1, math.ceil(replicas * 1.02))


def reproduce(layout: dict[str, Any], model: ReplicaModel) -> list[dict[str, Any]]:
    """Each measured step of ``layout`` next to the model's prediction for it."""
    rows = []
    for step in layout["closed"]:
        predicted = simulate_closed(model, replicas=layout["replicas"], clients=step["concurrency"])
        rows.append({"step": f"closed c={step['concurrency']}", "measured_rps": step["throughput_rps"],
                     "model_rps": predicted["throughput_rps"], "measured_p99_ms": step["p99_ms"],
                     "model_p99_ms": predicted["p99_ms"]})
    for step in layout["open"]:
        predicted = simulate_open(model, replicas=layout["replicas"], rate_rps=step["target_rate_rps"])
        rows.append({"step": f"open {step['target_rate_rps']:.1f}/s", "measured_rps": step["throughput_rps"],
                     "model_rps": step["target_rate_rps"], "measured_p99_ms": step["p99_ms"],
                     "model_p99_ms": predicted["p99_ms"]})
    return rows


def host_cpu_ms_per_image(layout: dict[str, Any], offline_ips: float) -> float:
    """CPU ms per image the service spends outside inference at its peak step: what stays on the host
    when a GPU runs the model (the peak's service cores per image, less the offline pipeline's time)."""
    peak = max(layout["closed"], key=lambda s: s["throughput_rps"])
    total_ms = 1000 * peak["cpu"]["service_cores"] / peak["throughput_rps"]
    return max(total_ms - 1000 / offline_ips, 0.0)


def _worst(pairs: list[tuple[float, float]]) -> float | None:
    """The largest |model / measured - 1| over ``pairs`` (None when there are none)."""
    errors = [abs(model / measured - 1.0) for model, measured in pairs if measured]
    return max(errors) if errors else None


def plan(data: dict[str, Any], *, gpu_service_ms: float, gpu_host_cores: int, offline_ips: float) -> dict[str, Any]:
    """Reproduce every measured layout, then size CPU fleets (each calibrated layout) and a GPU one on paper."""
    layouts = data["layouts"]
    out: dict[str, Any] = {"p99_target_ms": P99_TARGET_MS, "reproduction": {}, "fleets": {}}
    for name, layout in layouts.items():
        model = ReplicaModel.from_layout(layout)
        steps = reproduce(layout, model)
        out["reproduction"][name] = {
            "service_ms_mean": 1000 * float(model.service_s.mean()),
            "delay_ms_mean": 1000 * float(model.delay_s.mean()),
            "closed_rps_error": _worst(
                [(r["model_rps"], r["measured_rps"]) for r in steps if r["step"].startswith("c")]
            ),
            "closed_p99_error": _worst(
                [(r["model_p99_ms"], r["measured_p99_ms"]) for r in steps if r["step"].startswith("c")]
            ),
            "open_p99_error": _worst(
                [(r["model_p99_ms"], r["measured_p99_ms"]) for r in steps if r["step"].startswith("o")]
            ),
            "steps": steps,
        }
    # A deployed CPU replica = one process, one inference thread, its own core (deploy/base). Measured
    # here, a replica got only the CPU other jobs left it: "as measured" sizes a fleet of such replicas;
    # "per dedicated core" scales every time by the cores the replica had at its peak (CPU-bound work
    # takes that much less wall time with a whole core).
    for name in ("1x1", "2x1"):
        if name in layouts:
            model = ReplicaModel.from_layout(layouts[name])
            out["fleets"][f"cpu ({name}, as measured)"] = {
                f"{rate:.0f}": fleet_size(model, rate) for rate in TARGETS_IPS
            }
    layout = layouts["1x1"]
    peak = max(layout["closed"], key=lambda s: s["throughput_rps"])
    share = min(peak["cpu"]["service_cores"] / layout["replicas"], 1.0)
    dedicated = ReplicaModel.from_layout(layout).scaled(share, share)
    out["fleets"]["cpu (1x1, per dedicated core)"] = {
        "cores_at_peak": share, "peak_rps_per_core": peak["throughput_rps"] / share,
        **{f"{rate:.0f}": fleet_size(dedicated, rate) for rate in TARGETS_IPS}}
    # On paper: no GPU was measured. A GPU replica's one queue is its scarcer resource: the GPU at an
    # assumed time per image, or its host cores doing the measured non-inference work (decode, HTTP,
    # encode); the delay outside the queue is the 1x1 one on a dedicated core.
    base = dedicated
    host_ms = host_cpu_ms_per_image(layouts["1x1"], offline_ips)
    queue_ms = max(gpu_service_ms, host_ms / gpu_host_cores)
    gpu = base.scaled(queue_ms / 1000 / float(base.service_s.mean()))
    out["fleets"]["gpu (on paper)"] = {
        "assumed_gpu_ms_per_image": gpu_service_ms, "host_cores": gpu_host_cores,
        "host_cpu_ms_per_image": host_ms, "queue_ms_per_image": queue_ms,
        "bound_by": "gpu" if gpu_service_ms >= host_ms / gpu_host_cores else "host cpu",
        **{f"{rate:.0f}": fleet_size(gpu, rate) for rate in TARGETS_IPS}}
    return out


def _table(result: dict[str, Any]) -> str:
    lines = []
    for name, rep in result["reproduction"].items():
        lines.append(f"{name}: S {rep['service_ms_mean']:.1f} ms, D {rep['delay_ms_mean']:.1f} ms; worst error "
                     f"closed rps {rep['closed_rps_error']:.0%}, closed p99 {rep['closed_p99_error']:.0%}, "
                     f"open p99 {rep['open_p99_error']:.0%}")
        for row in rep["steps"]:
            lines.append(f"  {row['step']:16s} rps {row['measured_rps']:6.1f} vs {row['model_rps']:6.1f}   "
                         f"p99 {row['measured_p99_ms']:7.1f} vs {row['model_p99_ms']:7.1f} ms")
    for name, fleet in result["fleets"].items():
        sizes = ", ".join(f"{rate:.0f}/s: {fleet[f'{rate:.0f}']['replicas']}" for rate in TARGETS_IPS)
        lines.append(f"{name}: {sizes}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.capacity", description=__doc__.split("\n")[0])
    parser.add_argument("measured", help="scaleout-throughput-*.json from python -m loadtest.scaleout throughput")
    parser.add_argument("--out", default=None, help="JSON output (default: beside the input, capacity in the name)")
    parser.add_argument("--gpu-service-ms", type=float, default=1.0,
                        help="on paper: GPU time per image at the batch it runs (assumed, not measured)")
    parser.add_argument("--gpu-host-cores", type=int, default=8, help="on paper: host cores per GPU replica")
    parser.add_argument("--offline-ips", type=float, default=None,
                        help="offline pipeline img/s on one thread (default: loadtest/results/latest.json)")
    args = parser.parse_args(argv)
    source = Path(args.measured)
    data = json.loads(source.read_text())
    if "layouts" not in data:
        raise SystemExit(f"{source}: no 'layouts' (not a scaleout-throughput file)")
    offline_ips = args.offline_ips
    if offline_ips is None:
        latest = Path(__file__).resolve().parent / "results" / "latest.json"
        offline_ips = json.loads(latest.read_text())["offline"]["1"]["throughput_ips"]
    result = {"source": source.name, "machine": data.get("machine", {}).get("cpu_model"), "offline_ips": offline_ips,
              **plan(data, gpu_service_ms=args.gpu_service_ms, gpu_host_cores=args.gpu_host_cores,
                     offline_ips=offline_ips)}
    out = Path(args.out) if args.out else source.with_name(source.name.replace("throughput", "capacity"))
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(_table(result))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
