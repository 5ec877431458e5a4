"""Scale-out on one machine (issue #18), through the real service behind deploy/gateway/nginx.conf."""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import datetime as _dt
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil

from loadtest.bench import private_bentoml_home, service_command, thread_env
from loadtest.driver import LoadSpec
from loadtest.gateway import DIGEST_HEADER, Gateway, image_digest
from loadtest.http_load import run_http_load
from loadtest.stats import latency_summary
from loadtest.system import ServerProcess, free_port, machine_description, machine_slug
from loadtest.workload import Workload

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "loadtest" / "results"
HITS, MISSES = "medrefine_embedding_cache_hits_total", "medrefine_embedding_cache_misses_total"


@dataclass(frozen=True)
class Layout:
    """``replicas`` processes of ``python -m service``, each with ``threads`` inference threads."""

    name: str
    replicas: int
    threads: int


LAYOUTS = (Layout("1x1", 1, 1), Layout("2x1", 2, 1), Layout("1x2", 1, 2))


def _log(message: str) -> None:
    print(f"[scaleout] {message}", file=sys.stderr, flush=True)


class Replicas:
    """``layout.replicas`` servers on loopback over ``artifacts`` and the gateway in front of them."""

    def __init__(self, layout: Layout, artifacts: Path, work: Path, *, policy: str) -> None:
        self.servers: list[ServerProcess] = []
        self.ports: list[int] = []
        for index in range(layout.replicas):
            port, grpc_port = free_port(), free_port()
            env = {**thread_env(layout.threads), **private_bentoml_home(work / f"replica{index}"),
                   "MEDREFINE_INTRA_OP_THREADS": str(layout.threads)}
            self.servers.append(ServerProcess(
                service_command(artifacts, port=port, grpc_port=grpc_port, backend="onnxruntime"),
                ready_url=f"http://127.0.0.1:{port}/readyz", env=env, log_path=work / f"replica{index}.log",
                name=f"replica {index}"))
            self.ports.append(port)
        gateway_dir = work / "gateway"
        gateway_dir.mkdir(parents=True, exist_ok=True)
        self.gateway = Gateway([f"127.0.0.1:{p}" for p in self.ports], gateway_dir, policy=policy)

    def __enter__(self) -> Replicas:
        try:
            for server in self.servers:
                server.start()
            self.gateway.start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.gateway.stop()
        for server in self.servers:
            server.stop()

    def pids(self) -> list[int]:
        return [s.pid for s in self.servers if s.proc is not None] + (
            [self.gateway.process.pid] if self.gateway.process is not None else [])

    def cache_counts(self) -> tuple[float, float]:
        """(hits, misses) summed over the replicas' /metrics."""
        hits = misses = 0.0
        for port in self.ports:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
            hits += _metric(text, HITS)
            misses += _metric(text, MISSES)
        return hits, misses


def _metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


class CpuUse:
    """Average cores used by the replicas + gateway, this generator and the rest of the machine."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = list(pids)
        self._me = psutil.Process()
        self._start = self._snapshot()

    def _snapshot(self) -> tuple[float, float, float, float]:
        times = psutil.cpu_times()
        busy = sum(times) - times.idle - getattr(times, "iowait", 0.0)
        served = 0.0
        for pid in self.pids:
            try:
                root = psutil.Process(pid)
                for proc in [root, *root.children(recursive=True)]:
                    t = proc.cpu_times()
                    served += t.user + t.system
            except psutil.NoSuchProcess:
                continue
        own = self._me.cpu_times()
        return time.perf_counter(), busy, served, own.user + own.system

    def stop(self) -> dict[str, float]:
        end = self._snapshot()
        wall = max(end[0] - self._start[0], 1e-9)
        machine, served, loader = (end[i] - self._start[i] for i in (1, 2, 3))
        return {"service_cores": served / wall, "loader_cores": loader / wall,
                "other_cores": max(0.0, machine - served - loader) / wall, "machine_cores": machine / wall}


def _step(replicas: Replicas, spec: LoadSpec, workload: Workload, *, keep_latencies: bool) -> dict[str, Any]:
    cpu = CpuUse(replicas.pids())
    run = asyncio.run(run_http_load(replicas.gateway.url, "rest", spec, workload, timeout_s=60.0))
    summary = run.summary()
    summary["cpu"] = cpu.stop()
    if keep_latencies:  # the service-time samples loadtest/capacity.py resamples
        begin, end = run.window
        summary["latencies_ms"] = [round(1000 * r.latency_s, 2) for r in run.records if r.ok and begin <= r.end <= end]
    _log(f"  {spec.mode:6s} " + (f"c={spec.concurrency:<3d}" if spec.mode == "closed" else f"r={spec.rate_rps:<6.1f}")
         + f" -> {summary['throughput_rps']:6.2f} img/s  p50 {summary['p50_ms'] or 0:7.1f} ms  "
         f"p99 {summary['p99_ms'] or 0:7.1f} ms  err {summary['errors']}  service "
         f"{summary['cpu']['service_cores']:.2f} loader {summary['cpu']['loader_cores']:.2f} "
         f"other {summary['cpu']['other_cores']:.2f} cores")
    return summary


def measure_throughput(artifacts: Path, *, concurrencies: Sequence[int], step_s: float,
                       open_fractions: Sequence[float], image_size: int) -> dict[str, Any]:
    """Closed-loop steps per layout, then Poisson open-loop steps at ``open_fractions`` of its peak."""
    workload = Workload(size=image_size)
    layouts: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="medrefine-scaleout-") as tmp:
        for layout in LAYOUTS:
            _log(f"layout {layout.name}: {layout.replicas} replica(s) x {layout.threads} thread(s), round robin")
            with Replicas(layout, artifacts, Path(tmp) / layout.name, policy="round_robin") as replicas:
                asyncio.run(run_http_load(replicas.gateway.url, "rest",
                                          LoadSpec(concurrency=max(concurrencies), duration_s=5.0), workload))
                closed = [_step(replicas, LoadSpec(concurrency=c, duration_s=step_s, warmup_s=2.0), workload,
                                keep_latencies=True) for c in concurrencies]
                peak = max(closed, key=lambda s: s["throughput_rps"])
                opened = [_step(replicas, LoadSpec(mode="open", rate_rps=round(f * peak["throughput_rps"], 2),
                                                   duration_s=step_s + 5, warmup_s=2.0, seed=7), workload,
                                keep_latencies=True) for f in open_fractions]
            layouts[layout.name] = {"replicas": layout.replicas, "threads_per_replica": layout.threads,
                                    "closed": closed, "open": opened, "peak_throughput_rps": peak["throughput_rps"],
                                    "peak_concurrency": peak["concurrency"]}
    return {"image_size": image_size, "protocol": "rest /segment via deploy/gateway (round robin)",
            "layouts": layouts}


def _interactive_client(url: str, pngs: Sequence[bytes], prompts: int) -> list[dict[str, Any]]:
    """One user: each image in turn, ``prompts`` /refine edits of a box around the phantom's centre."""
    answers = []
    with httpx.Client(base_url=url, timeout=120) as client:
        for png in pngs:
            for k in range(prompts):
                box = [40 + 4 * k, 44 + 2 * k, 200 - 3 * k, 210 - 4 * k]
                started = time.perf_counter()
                response = client.post("/refine", files={"file": ("i.png", png, "image/png")},
                                       data={"box": json.dumps(box)}, headers={DIGEST_HEADER: image_digest(png)})
                latency_ms = 1000 * (time.perf_counter() - started)
                if response.status_code != 200:
                    raise RuntimeError(f"/refine answered {response.status_code}: {response.text[:300]}")
                answers.append({"hit": response.json()["cache_hit"], "latency_ms": latency_ms,
                                "replica": response.headers.get("X-Medrefine-Replica")})
    return answers


def measure_cache(
    artifacts: Path, *, users: int, images_per_user: int, prompts: int, image_size: int
) -> dict[str, Any]:
    """Hit rate of the replayed session for 1 replica, and 2 behind round robin or consistent hashing."""
    cases = (
        ("1 replica", Layout("1x1", 1, 1), "hash"),
        ("2 replicas, round robin", Layout("2x1", 2, 1), "round_robin"),
        ("2 replicas, consistent hash", Layout("2x1", 2, 1), "hash"),
    )
    workload = Workload(size=image_size, pool_size=users * images_per_user, bases=users * images_per_user, seed=500)
    results = {}
    with tempfile.TemporaryDirectory(prefix="medrefine-scaleout-cache-") as tmp:
        for index, (name, layout, policy) in enumerate(cases):
            _log(f"cache: {name}")
            with Replicas(layout, artifacts, Path(tmp) / str(index), policy=policy) as replicas:
                before = replicas.cache_counts()
                cpu = CpuUse(replicas.pids())
                started = time.perf_counter()
                with concurrent.futures.ThreadPoolExecutor(users) as pool:
                    futures = [pool.submit(_interactive_client, replicas.gateway.url,
                                           [workload.png(u * images_per_user + i) for i in range(images_per_user)],
                                           prompts) for u in range(users)]
                    answers = [a for f in futures for a in f.result()]
                wall = time.perf_counter() - started
                after = replicas.cache_counts()
                hits, misses = after[0] - before[0], after[1] - before[1]
                results[name] = {
                    "replicas": layout.replicas, "policy": policy, "requests": len(answers),
                    "hits": hits, "misses": misses, "hit_rate": hits / max(hits + misses, 1),
                    "best_possible_hit_rate": (prompts - 1) / prompts,
                    "latency_hit_ms": latency_summary([a["latency_ms"] / 1000 for a in answers if a["hit"]]),
                    "latency_miss_ms": latency_summary([a["latency_ms"] / 1000 for a in answers if not a["hit"]]),
                    "session_s": wall, "cpu": cpu.stop(),
                    "requests_per_replica": {r: sum(1 for a in answers if a["replica"] == r)
                                             for r in sorted({a["replica"] for a in answers})},
                }
                _log(f"  hit rate {results[name]['hit_rate']:.3f} ({hits:.0f}/{hits + misses:.0f}) in {wall:.1f} s")
    return {"session": {"users": users, "images_per_user": images_per_user, "prompts_per_image": prompts,
                        "image_size": image_size, "endpoint": "rest /refine (box prompts), X-Medrefine-Image set"},
            "cases": results}


def write(part: str, data: dict[str, Any], out: str | None) -> Path:
    machine = machine_description()
    path = Path(out) if out else RESULTS_DIR / f"scaleout-{part}-{machine_slug(machine)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine,
              "command": "python -m loadtest.scaleout " + " ".join(sys.argv[1:]), **data}
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.scaleout", description=__doc__.split("\n")[0])
    parser.add_argument("part", choices=("throughput", "cache"))
    parser.add_argument("--artifacts", default=str(REPO_ROOT / "artifacts" / "default"))
    parser.add_argument("--out", default=None)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--concurrency", default="1,2,4,8", help="closed-loop steps (throughput)")
    parser.add_argument("--step-s", type=float, default=15.0)
    parser.add_argument("--open-fractions", default="0.5,0.8", help="open-loop rates as fractions of the peak")
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--images-per-user", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=5)
    args = parser.parse_args(argv)
    artifacts = Path(args.artifacts)
    if not (artifacts / "manifest.json").is_file():
        parser.error(f"--artifacts {artifacts}: no manifest.json (run `make export`)")
    _log(f"CPU {machine_description()['cpu_model']}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}")
    if args.part == "throughput":
        data = measure_throughput(artifacts, concurrencies=[int(c) for c in args.concurrency.split(",")],
                                  step_s=args.step_s, image_size=args.image_size,
                                  open_fractions=[float(f) for f in args.open_fractions.split(",")])
    else:
        data = measure_cache(artifacts, users=args.users, images_per_user=args.images_per_user, prompts=args.prompts,
                             image_size=args.image_size)
    _log(f"wrote {write(args.part, data, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
