"""``python -m loadtest.generation_bench``: text-to-image throughput offline and served, side by side."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx

from loadtest.bench import private_bentoml_home, thread_env
from loadtest.prom import parse_histogram
from loadtest.stats import latency_summary
from loadtest.system import REPO_ROOT, ServerProcess, free_port, machine_description, machine_slug

GENERATION_BATCH_METRIC = "medrefine_generation_batch_size"
PROMPTS = [("chest x-ray, left lower lobe nodule", "chest_xray"), ("brain mri, glioma", "brain_mri"),
           ("retinal oct, drusen", "oct"), ("fundus photograph, normal fundus", "fundus"),
           ("chest ct, emphysema", "chest_ct")]


def _log(message: str) -> None:
    print(f"[generation-bench] {message}", file=sys.stderr, flush=True)


def offline_throughput(generators_dir: Path, *, concurrency: list[int], steps: int, threads: int,
                       duration_s: float) -> dict[str, Any]:
    """Images/s of ``sample_many`` over ``k`` one-image requests, for each ``k`` (ONNX Runtime, ``threads``)."""
    import torch

    from inference.generation import GenerationRequest
    from inference.generator_artifacts import load_generators

    torch.set_num_threads(threads)
    pipeline = load_generators(generators_dir, intra_op_threads=threads).text2image
    results = {}
    for k in concurrency:
        requests = [GenerationRequest([PROMPTS[i % len(PROMPTS)][0]], [PROMPTS[i % len(PROMPTS)][1]],
                                      guidance_scale=1.5, steps=steps, seed=i) for i in range(k)]
        pipeline.sample_many(requests)  # warm-up
        calls, started = 0, time.perf_counter()
        while calls == 0 or time.perf_counter() - started < duration_s:
            pipeline.sample_many(requests)
            calls += 1
        seconds = time.perf_counter() - started
        results[str(k)] = {"images_per_s": calls * k / seconds, "seconds_per_call": seconds / calls, "calls": calls}
        _log(f"offline k={k}: {results[str(k)]['images_per_s']:.1f} images/s")
    return results


async def _closed_loop(url: str, headers: dict[str, str], *, clients: int, steps: int,
                       duration_s: float) -> dict[str, Any]:
    latencies: list[float] = []
    errors: dict[str, int] = {}
    deadline = time.perf_counter() + duration_s

    async def client(index: int, http: httpx.AsyncClient) -> None:
        sent = 0
        while time.perf_counter() < deadline:
            prompt, modality = PROMPTS[(index + sent) % len(PROMPTS)]
            body = {"prompt": prompt, "modality": modality, "steps": steps, "seed": index * 100_000 + sent}
            started = time.perf_counter()
            try:
                response = await http.post(url + "/generate", json=body, headers=headers)
                status = str(response.status_code)
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            if status == "200":
                latencies.append(time.perf_counter() - started)
            else:
                errors[status] = errors.get(status, 0) + 1
            sent += 1

    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=120.0, limits=httpx.Limits(max_connections=clients + 4)) as http:
        await asyncio.gather(*(client(i, http) for i in range(clients)))
    seconds = time.perf_counter() - started
    return {"clients": clients, "seconds": seconds, "completed": len(latencies),
            "images_per_s": len(latencies) / seconds, "errors": errors, **latency_summary(latencies)}


def served_throughput(art_dir: Path, generators_dir: Path, work: Path, *, batch: int, concurrency: list[int],
                      steps: int, threads: int, duration_s: float) -> dict[str, Any]:
    """Closed-loop ``/generate`` load on a server with ``MEDREFINE_MAX_BATCH_SIZE=batch``, per client count."""
    port = free_port()
    env = {**thread_env(threads), **private_bentoml_home(work / f"batch{batch}"),
           "MEDREFINE_INTRA_OP_THREADS": str(threads), "MEDREFINE_MAX_BATCH_SIZE": str(batch),
           "MEDREFINE_MAX_LATENCY_MS": "10", "MEDREFINE_GENERATION_MAX_QUEUE": "64",
           "MEDREFINE_GENERATORS": str(generators_dir), "BENTOML_DO_NOT_TRACK": "True"}
    argv = [sys.executable, "-m", "service", "--port", str(port), "--grpc-port", "0", "--artifacts", str(art_dir)]
    url = f"http://127.0.0.1:{port}"
    steps_results = {}
    with ServerProcess(argv, ready_url=url + "/readyz", env=env, log_path=work / f"server-batch{batch}.log",
                       name=f"service (max batch {batch})"):
        asyncio.run(_closed_loop(url, {}, clients=2, steps=steps, duration_s=3.0))  # warm-up
        for k in concurrency:
            before = parse_histogram(httpx.get(url + "/metrics").text, GENERATION_BATCH_METRIC)
            result = asyncio.run(_closed_loop(url, {}, clients=k, steps=steps, duration_s=duration_s))
            after = parse_histogram(httpx.get(url + "/metrics").text, GENERATION_BATCH_METRIC)
            result["batch_sizes"] = (after - before).distribution() if after and before else None
            steps_results[str(k)] = result
            _log(f"served max-batch {batch}, {k} clients: {result['images_per_s']:.1f} images/s, "
                 f"p50 {result['p50_ms'] or 0:.0f} ms, p99 {result['p99_ms'] or 0:.0f} ms, errors {result['errors']}")
    return steps_results


def run(args: argparse.Namespace) -> dict[str, Any]:
    from export.generators import export_generator_artifacts
    from export.onnx_export import export_artifacts

    concurrency = [int(v) for v in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory(prefix="medrefine-generation-bench-") as tmp:
        work = Path(tmp)
        generators_dir = Path(args.generators) if args.generators else work / "generators"
        if not args.generators:
            _log("exporting the default generators")
            export_generator_artifacts("default", generators_dir)
        art_dir = work / "artifacts"
        _log("exporting the default segmentation model (the server needs one)")
        export_artifacts(REPO_ROOT / "checkpoints" / "default", art_dir)
        offline = offline_throughput(generators_dir, concurrency=concurrency, steps=args.steps,
                                     threads=args.threads, duration_s=args.duration_s)
        unbatched = served_throughput(art_dir, generators_dir, work, batch=1, concurrency=concurrency,
                                      steps=args.steps, threads=args.threads, duration_s=args.duration_s)
        batched = served_throughput(art_dir, generators_dir, work, batch=16, concurrency=concurrency,
                                    steps=args.steps, threads=args.threads, duration_s=args.duration_s)
    top = str(max(concurrency))
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m loadtest.generation_bench " + " ".join(sys.argv[1:]),
        "machine": machine_description(),
        "config": {"steps": args.steps, "guidance_scale": 1.5, "images_per_request": 1, "threads": args.threads,
                   "duration_s": args.duration_s, "concurrency": concurrency, "model": "checkpoints/generators"},
        "offline": offline,
        "served_unbatched": unbatched,
        "served_batched": batched,
        "batched_over_unbatched": batched[top]["images_per_s"] / unbatched[top]["images_per_s"],
        "served_over_offline": batched[top]["images_per_s"] / offline[top]["images_per_s"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.generation_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", default="1,4,8,16", help="comma list of concurrent requests")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--duration-s", type=float, default=20.0, help="per measurement")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime / torch threads, offline and served")
    parser.add_argument("--generators", help="an exported generator directory (default: export the committed ones)")
    parser.add_argument("--out", help="JSON path (default loadtest/results/generation-MACHINE.json)")
    args = parser.parse_args(argv)
    data = run(args)
    out = Path(args.out) if args.out else (REPO_ROOT / "loadtest" / "results" /
                                           f"generation-{machine_slug(data['machine'])}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n")
    print(json.dumps({k: data[k] for k in ("batched_over_unbatched", "served_over_offline")}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
