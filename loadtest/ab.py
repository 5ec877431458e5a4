"""Interleaved A/B of servers on a shared machine: every variant gets the same short load steps, round after round
(A, B, A, B, ...), so a change in the machine's load hits all alike; the medians over rounds are the verdict.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadtest.bench import RESULTS_DIR, Target, private_bentoml_home, run_step, service_command, thread_env
from loadtest.driver import LoadSpec
from loadtest.system import REPO_ROOT, ServerProcess, free_port, git_sha, machine_description
from loadtest.tenants import busiest_processes
from loadtest.workload import Workload

__all__ = ["Variant", "main", "parse_step", "parse_variant", "run_ab", "step_medians"]

SERVERS = ("ours", "kserve")


@dataclass(frozen=True)
class Variant:
    """One server under test: ``ours`` or ``kserve``, importing our code from the working tree, from git ``ref``
    or from the source tree ``code``, with ``env``."""

    name: str
    server: str = "ours"
    ref: str | None = None
    code: str | None = None
    env: dict[str, str] = field(default_factory=dict)


def parse_variant(text: str) -> Variant:
    """``NAME=key=value,key=value``: keys ``server`` (ours|kserve), ``ref`` (a git ref) or ``code`` (a directory
    holding a copy of the repository's packages; default for both: the working tree); any other key is an
    environment variable of the server (e.g. ``MEDREFINE_MAX_LATENCY_MS=0``).

    Raises:
        ValueError: no name, a pair without ``=``, or an unknown server.
    """
    name, _, spec = text.partition("=")
    if not name:
        raise ValueError(f"--variant {text!r}: expected NAME=key=value,...")
    values: dict[str, str] = {}
    for pair in filter(None, spec.split(",")):
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--variant {text!r}: {pair!r} is not key=value")
        values[key] = value
    server = values.pop("server", "ours")
    if server not in SERVERS:
        raise ValueError(f"--variant {text!r}: server {server!r} unknown; choose from {SERVERS}")
    return Variant(name=name, server=server, ref=values.pop("ref", None), code=values.pop("code", None), env=values)


def parse_step(text: str) -> LoadSpec:
    """``closed:C`` (C concurrent) or ``open:R`` (R arrivals/s, evenly spaced) or ``poisson:R``; duration set later.

    Raises:
        ValueError: another form.
    """
    kind, _, value = text.partition(":")
    if kind == "closed":
        return LoadSpec(mode="closed", concurrency=int(value))
    if kind in ("open", "poisson"):
        return LoadSpec(mode="open", rate_rps=float(value), arrival="fixed" if kind == "open" else "poisson")
    raise ValueError(f"--step {text!r}: expected closed:C, open:R or poisson:R")


def _export_ref(ref: str, into: Path) -> Path:
    """The tree of git ``ref`` unpacked into ``into`` (the code a baseline server imports)."""
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "archive", ref], cwd=REPO_ROOT, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def _code(variant: Variant, work: Path) -> Path | None:
    """The source tree ``variant`` imports our packages from (None: the working tree)."""
    if variant.ref is not None:
        return _export_ref(variant.ref, work / f"code-{variant.name}")
    return None if variant.code is None else Path(variant.code).resolve()


def _ours(variant: Variant, art_dir: Path, work: Path, threads: int) -> tuple[ServerProcess, str]:
    port, grpc_port = free_port(), free_port()
    argv = service_command(art_dir, port=port, grpc_port=grpc_port, backend="onnxruntime")
    code = _code(variant, work)
    if code is not None:  # the service from another tree: that tree first on sys.path
        argv = [argv[0], "-c", f"import runpy, sys; sys.path.insert(0, {str(code)!r}); "
                "runpy.run_module('service', run_name='__main__', alter_sys=True)", *argv[3:]]
    env = {**thread_env(threads), **private_bentoml_home(work / variant.name), "MEDREFINE_INTRA_OP_THREADS":
           str(threads), "MEDREFINE_REQUEST_TIMEOUT_S": "60", **variant.env}
    server = ServerProcess(argv, ready_url=f"http://127.0.0.1:{port}/readyz", env=env,
                           log_path=work / f"{variant.name}.log", name=variant.name)
    return server, f"127.0.0.1:{grpc_port}"


def _server(variant: Variant, art_dir: Path, work: Path, threads: int) -> tuple[ServerProcess, str]:
    if variant.server == "ours":
        return _ours(variant, art_dir, work, threads)
    from loadtest.peers.launch import PEER_MAX_BATCH_SIZE, launch_peer

    peer = launch_peer("kserve", art_dir, threads=threads, max_batch_size=PEER_MAX_BATCH_SIZE, work=work,
                       thread_env={**thread_env(threads), **variant.env})
    code = _code(variant, work)
    if code is not None:
        peer.server.env["PYTHONPATH"] = str(code)
    return peer.server, peer.urls["grpc"]


def step_medians(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Medians over rounds of one variant's step: throughput, p50, p99, server cores and CPU ms per request."""
    def med(key: str) -> float | None:
        values = [r[key] for r in runs if r.get(key) is not None]
        return statistics.median(values) if values else None

    cpu_ms = [1000.0 * r["cpu"]["server_cores"] / r["throughput_rps"] for r in runs if r["throughput_rps"]]
    return {"rounds": len(runs), "throughput_rps": med("throughput_rps"), "p50_ms": med("p50_ms"),
            "p99_ms": med("p99_ms"), "errors": sum(r["errors"] for r in runs),
            "server_cores": statistics.median(r["cpu"]["server_cores"] for r in runs),
            "other_cores": statistics.median(r["cpu"]["other_cores"] for r in runs),
            "server_cpu_ms_per_request": statistics.median(cpu_ms) if cpu_ms else None}


def run_ab(variants: Sequence[Variant], steps: Sequence[LoadSpec], *, art_dir: Path, rounds: int, duration_s: float,
           warmup_s: float, threads: int = 1, image_size: int = 256) -> dict[str, Any]:
    """Start every variant, then ``rounds`` rounds of every step on every variant (order rotated each round)."""
    workload = Workload(size=image_size)
    raw: dict[str, dict[str, list[dict[str, Any]]]] = {v.name: {} for v in variants}
    loads: list[float] = []
    with tempfile.TemporaryDirectory(prefix="medrefine-ab-") as tmp:
        work = Path(tmp)
        started = [(v, *_server(v, art_dir, work, threads)) for v in variants]
        try:
            for _, server, _ in started:
                server.start()
            for _, server, url in started:  # warm every engine before the first timed step
                run_step(Target("warm", "grpc", url, None, server.pid),
                         LoadSpec(mode="closed", concurrency=4, duration_s=2.0), workload)
            for round_index in range(rounds):
                shift = round_index % len(started)
                for variant, server, url in started[shift:] + started[:shift]:
                    target = Target(variant.name, "grpc", url, None, server.pid)
                    for index, base in enumerate(steps):
                        spec = LoadSpec(mode=base.mode, concurrency=base.concurrency, rate_rps=base.rate_rps,
                                        arrival=base.arrival, duration_s=duration_s, warmup_s=warmup_s,
                                        seed=round_index)
                        loads.append(os.getloadavg()[0])
                        step = run_step(target, spec, workload)
                        step["round"] = round_index
                        raw[variant.name].setdefault(str(index), []).append(step)
        finally:
            for _, server, _ in started:
                server.stop()
    step_names = [f"closed c={s.concurrency}" if s.mode == "closed" else f"{s.arrival} {s.rate_rps:g}/s"
                  for s in steps]
    return {
        "steps": step_names,
        "medians": {name: {step_names[int(i)]: step_medians(runs) for i, runs in by_step.items()}
                    for name, by_step in raw.items()},
        "raw": {name: {step_names[int(i)]: runs for i, runs in by_step.items()} for name, by_step in raw.items()},
        "load_average_1min": {"min": min(loads), "max": max(loads), "median": statistics.median(loads)},
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.ab", description=__doc__)
    parser.add_argument("--artifacts", required=True, help="artifact directory every server serves")
    parser.add_argument("--variant", action="append", required=True, type=parse_variant,
                        help="NAME=server=ours|kserve,ref=GIT_REF,MEDREFINE_X=value (repeat; at least two)")
    parser.add_argument("--step", action="append", type=parse_step, default=None,
                        help="closed:C | open:R (evenly spaced) | poisson:R (repeat; default closed:1, closed:8)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration-s", type=float, default=6.0)
    parser.add_argument("--warmup-s", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--note", default="")
    parser.add_argument("--out", default=None, help="results JSON (default loadtest/results/ab-<date>.json)")
    args = parser.parse_args(argv)
    steps = args.step or [parse_step("closed:1"), parse_step("closed:8")]
    created = _dt.datetime.now(_dt.timezone.utc)
    result = run_ab(args.variant, steps, art_dir=Path(args.artifacts), rounds=args.rounds,
                    duration_s=args.duration_s, warmup_s=args.warmup_s, threads=args.threads)
    data = {"format": "medrefine-ab/1", "created": created.isoformat(timespec="seconds"), "git": git_sha(),
            "machine": machine_description(), "tenants_end": busiest_processes(), "note": args.note,
            "config": {"rounds": args.rounds, "duration_s": args.duration_s, "warmup_s": args.warmup_s,
                       "threads": args.threads, "protocol": "grpc"},
            "variants": [{"name": v.name, "server": v.server, "ref": v.ref, "code": v.code, "env": v.env}
                         for v in args.variant],
            **result}
    out = Path(args.out) if args.out else RESULTS_DIR / f"ab-{created.strftime('%Y%m%d-%H%M')}.json"
    out.write_text(json.dumps(data, indent=1, default=str) + "\n")
    for name, by_step in data["medians"].items():
        for step, m in by_step.items():
            print(f"{name:12s} {step:16s} {m['throughput_rps']:6.1f} rps  p50 {m['p50_ms']:6.1f}"
                  f"  p99 {m['p99_ms']:7.1f} ms"
                  f"  server {m['server_cores']:.2f} cores, {m['server_cpu_ms_per_request'] or 0:.1f} ms CPU/req"
                  f"  other {m['other_cores']:.2f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
