"""``python -m loadtest optimize``: fp32 against each CPU optimisation, offline, A/B in interleaved rounds."""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from loadtest.system import REPO_ROOT, machine_description, machine_slug

__all__ = ["add_arguments", "run"]

HELDOUT_SEED = 7000  # training.quality's LESION_SEED: held out from training and from int8 calibration
VARIANTS: dict[str, dict[str, Any]] = {
    "int8": {"int8": ["transunet"]},
    "fused_rel_pos": {"fuse_rel_pos": True},
    "fused_rel_pos_int8": {"int8": ["transunet"], "fuse_rel_pos": True},
}
# Variants that are another engine over an exported directory: (directory variant, engine backend, engine options).
ENGINE_VARIANTS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "openvino_fp32": ("fp32", "openvino", {"precision": "fp32", "onnxruntime_graphs": []}),
    "openvino_bf16": ("fp32", "openvino", {"precision": "bf16", "onnxruntime_graphs": []}),
    # the openvino engine's default: bf16 encoders, the SAM decoder on ONNX Runtime
    "openvino_bf16_ort_decoder": ("fp32", "openvino", {}),
}
MAX_DICE_DELTA = 0.005  # issue #19: an optimisation may cost at most this much held-out Dice
SHARED_CORES = 0.2  # other processes' mean CPU above which the verdict uses images per CPU-second

# (artifact directory, engine backend, engine options): what a variant's pipeline is built from
Spec = tuple[Path, str, dict[str, Any]]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default", help="run directory, or 'default' (checkpoints/default)")
    parser.add_argument("--fp32", default="artifacts/default", help="fp32 artifacts of the same run")
    parser.add_argument("--work", default=None, help="where the variants are exported (default: a temp dir)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--round-s", type=float, default=3.0, help="seconds per cell per round")
    parser.add_argument("--batch-sizes", type=lambda s: [int(v) for v in s.split(",")], default=[1, 16])
    parser.add_argument("--heldout", type=int, default=40, help="held-out phantoms for Dice")
    parser.add_argument("--variants", type=lambda s: [v for v in s.split(",") if v], default=None,
                        help="comma-separated variants to compare with fp32 (default: all of VARIANTS and "
                             "ENGINE_VARIANTS)")
    parser.add_argument("--skip-graphs", action="store_true", help="no per-graph A/B")
    parser.add_argument("--skip-processes", action="store_true", help="only one process with one thread")
    parser.add_argument("--note", default="")
    parser.add_argument("--out", default=None,
                        help="results JSON (default loadtest/results/optimize-<cpu>-<date>.json)")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ variants
def build_variants(run_dir: Path, fp32_dir: Path, work: Path, names: Sequence[str] | None = None) -> dict[str, Path]:
    """{variant: artifact directory} for ``names`` of ``VARIANTS`` (default all); exports the ones ``work`` lacks
    (each parity-checked as usual)."""
    from export.onnx_export import export_artifacts
    from inference.manifest import load_manifest

    dirs = {"fp32": fp32_dir}
    expected_weights = load_manifest(fp32_dir)["source"]["weights_sha256"]
    for name, options in VARIANTS.items():
        if names is not None and name not in names:
            continue
        out = work / name
        if (out / "manifest.json").is_file() and load_manifest(out)["source"]["weights_sha256"] == expected_weights:
            _log(f"variant {name}: reusing {out}")
        else:
            _log(f"variant {name}: exporting {options} ...")
            started = time.perf_counter()
            export_artifacts(run_dir, out, **options)
            _log(f"variant {name}: {time.perf_counter() - started:.0f} s")
        dirs[name] = out
    return dirs


def _images(count: int, seed: int = HELDOUT_SEED) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(images (256, 256) float32 in [0, 1], truth masks (256, 256) bool) of held-out lesion phantoms."""
    from core.phantoms import breast_ultrasound, sample_seed

    pairs = [breast_ultrasound(sample_seed(seed, i), 256) for i in range(count)]
    return [p[0].astype(np.float32) / 255.0 for p in pairs], [p[1] > 0 for p in pairs]


def variant_specs(dirs: Mapping[str, Path], names: Sequence[str] | None = None) -> dict[str, Spec]:
    """{variant: (artifact directory, backend, engine options)}: every exported directory on ONNX Runtime,
    then those of ``ENGINE_VARIANTS`` in ``names`` (default all) over theirs."""
    specs: dict[str, Spec] = {name: (d, "onnxruntime", {}) for name, d in dirs.items()}
    for name, (base, backend, options) in ENGINE_VARIANTS.items():
        if names is None or name in names:
            specs[name] = (dirs[base], backend, dict(options))
    return specs


def _pipeline(spec: Spec, threads: int) -> Any:
    from inference.pipeline import SegmentationPipeline

    art_dir, backend, options = spec
    return SegmentationPipeline.from_artifacts(art_dir, backend, intra_op_threads=threads, embedding_cache_bytes=0,
                                               **options)


# ------------------------------------------------------------------ pipeline workers
def _worker(conn: Any, specs: Mapping[str, Spec], threads: int, pool_size: int) -> None:
    """Worker process: one pipeline per variant; answers ("segment", variant, batch, seconds) commands."""
    import torch

    torch.set_num_threads(threads)
    pipelines = {name: _pipeline(spec, threads) for name, spec in specs.items()}
    pool, _ = _images(pool_size)
    cursor = 0
    conn.send("ready")
    while True:
        command = conn.recv()
        if command is None:
            return
        _, variant, batch, seconds = command
        pipeline = pipelines[variant]
        pipeline.segment(pool[:batch])  # warm: first call of this shape
        calls, images = 0, 0
        cpu0, t0 = time.process_time(), time.perf_counter()
        while time.perf_counter() - t0 < seconds or calls < 2:
            chunk = [pool[(cursor + k) % len(pool)] for k in range(batch)]
            cursor += batch
            pipeline.segment(chunk)
            calls += 1
            images += batch
        conn.send({"images": images, "calls": calls, "wall_s": time.perf_counter() - t0,
                   "cpu_s": time.process_time() - cpu0})


class _Workers:
    """``count`` worker processes (``threads`` each) holding every variant's pipeline."""

    def __init__(self, specs: Mapping[str, Spec], count: int, threads: int) -> None:
        ctx = mp.get_context("spawn")
        self.conns, self.procs = [], []
        env_threads = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = str(threads)  # inherited by the spawned interpreters
        try:
            for _ in range(count):
                here, there = ctx.Pipe()
                proc = ctx.Process(target=_worker, args=(there, dict(specs), threads, 64), daemon=True)
                proc.start()
                self.conns.append(here)
                self.procs.append(proc)
        finally:
            if env_threads is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = env_threads
        for conn in self.conns:
            if conn.recv() != "ready":
                raise RuntimeError("a benchmark worker failed to start")

    def segment(self, variant: str, batch: int, seconds: float) -> dict[str, Any]:
        """All workers at once; images per second summed over workers, CPU per image over all of them."""
        for conn in self.conns:
            conn.send(("segment", variant, batch, seconds))
        rows = [conn.recv() for conn in self.conns]
        images = sum(r["images"] for r in rows)
        cpu = sum(r["cpu_s"] for r in rows)
        return {"ips": sum(r["images"] / r["wall_s"] for r in rows), "images_per_cpu_s": images / cpu,
                "calls": sum(r["calls"] for r in rows)}

    def close(self) -> None:
        for conn in self.conns:
            conn.send(None)
        for proc in self.procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.terminate()


class _Machine:
    """Load average and other processes' CPU (cores) between ``start`` and ``stop``."""

    def __init__(self) -> None:
        self._me = psutil.Process()

    def _busy(self) -> tuple[float, float]:
        times = psutil.cpu_times()
        busy = sum(times) - times.idle - getattr(times, "iowait", 0.0)
        own = 0.0
        for proc in [self._me, *self._me.children(recursive=True)]:
            try:
                t = proc.cpu_times()
                own += t.user + t.system
            except psutil.NoSuchProcess:
                continue
        return busy, own

    def start(self) -> None:
        self._t, (self._busy0, self._own0) = time.perf_counter(), self._busy()

    def stop(self) -> dict[str, float]:
        wall = time.perf_counter() - self._t
        busy, own = self._busy()
        return {"loadavg_1min": round(os.getloadavg()[0], 3),
                "other_cores": round(max(0.0, (busy - self._busy0) - (own - self._own0)) / wall, 3)}


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def pipeline_ab(specs: Mapping[str, Spec], configs: Mapping[str, tuple[int, int, Sequence[str]]],
                batch_sizes: Sequence[int], rounds: int, round_s: float) -> dict[str, Any]:
    """{config: {variant: {batch: medians and per-round figures}}}, configs named "1p1t" etc.

    ``configs`` maps a name to (processes, threads per process, variants measured).
    """
    out: dict[str, Any] = {}
    machine = _Machine()
    for config, (procs, threads, variants) in configs.items():
        workers = _Workers({v: specs[v] for v in variants}, procs, threads)
        cells = [(v, b) for b in batch_sizes for v in variants]
        per: dict[tuple[str, int], list[dict[str, Any]]] = {c: [] for c in cells}
        try:
            for r in range(rounds):
                machine.start()
                shift = r % len(cells)
                for variant, batch in cells[shift:] + cells[:shift]:
                    per[(variant, batch)].append(workers.segment(variant, batch, round_s))
                load = machine.stop()
                for cell in cells:
                    per[cell][-1].update(load)
                _log(f"  {config} round {r + 1}/{rounds}: " + ", ".join(
                    f"{v} b{b} {per[(v, b)][-1]['ips']:.1f}" for v, b in cells) + f" img/s; load {load}")
        finally:
            workers.close()
        block: dict[str, Any] = {"processes": procs, "threads_per_process": threads, "variants": {}}
        for variant, batch in cells:
            rows = per[(variant, batch)]
            base = per[("fp32", batch)]
            entry = {
                "ips_median": _median([r["ips"] for r in rows]),
                "images_per_cpu_s_median": _median([r["images_per_cpu_s"] for r in rows]),
                "ips_rounds": [round(r["ips"], 3) for r in rows],
                "over_fp32_median": _median([r["ips"] / b["ips"] for r, b in zip(rows, base, strict=True)]),
                "over_fp32_rounds": [round(r["ips"] / b["ips"], 3) for r, b in zip(rows, base, strict=True)],
                "over_fp32_cpu_median": _median([r["images_per_cpu_s"] / b["images_per_cpu_s"]
                                                 for r, b in zip(rows, base, strict=True)]),
                "loadavg_1min_rounds": [r["loadavg_1min"] for r in rows],
                "other_cores_rounds": [r["other_cores"] for r in rows],
            }
            block["variants"].setdefault(variant, {})[str(batch)] = entry
        out[config] = block
    return out


# ------------------------------------------------------------------ single graphs
def _session(path: Path, level: str = "all", saved: Path | None = None) -> Any:
    import onnxruntime as ort

    from inference.engines import ort_session_options

    options = ort_session_options(1)
    levels = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED}
    options.graph_optimization_level = levels[level]
    if saved is not None:
        options.optimized_model_filepath = str(saved)
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def graph_ab(dirs: Mapping[str, Path], work: Path, batch_sizes: Sequence[int], rounds: int,
             round_s: float) -> dict[str, Any]:
    """Per graph: ms per call of each candidate against the fp32 graph, on inputs recorded from the pipeline."""
    from export.quantize import (
        CALIBRATION_IMAGES,
        CALIBRATION_SEED,
        phantom_images,
        quantize_graph,
        record_graph_inputs,
    )

    feeds = record_graph_inputs(dirs["fp32"], phantom_images(CALIBRATION_SEED + 1, 16))
    calibration = record_graph_inputs(dirs["fp32"], phantom_images(CALIBRATION_SEED, CALIBRATION_IMAGES))
    scratch = work / "graphs"
    scratch.mkdir(parents=True, exist_ok=True)
    candidates: dict[str, dict[str, Callable[[], Any]]] = {}
    tu, enc = dirs["fp32"] / "transunet.onnx", dirs["fp32"] / "image_encoder.onnx"
    fused = dirs["fused_rel_pos"] / "image_encoder.onnx" if "fused_rel_pos" in dirs else None
    # a model optimised offline (EXTENDED: portable) and loaded with the runtime's own optimisations on top
    _session(tu, "extended", scratch / "transunet.opt.onnx")
    _session(enc, "extended", scratch / "image_encoder.opt.onnx")
    for ops, tag in ((("Conv", "MatMul"), "int8_conv_matmul"), (("Conv",), "int8_conv"), (None, "int8_all_ops")):
        quantize_graph(tu, scratch / f"transunet.{tag}.onnx", calibration["transunet"], op_types=ops)
    quantize_graph(enc, scratch / "image_encoder.int8_matmul.onnx", calibration["image_encoder"], op_types=("MatMul",))
    if fused is not None:
        quantize_graph(fused, scratch / "image_encoder.fused.int8_matmul.onnx", calibration["image_encoder"],
                       op_types=("MatMul",))
    candidates["transunet"] = {
        "fp32": lambda: _session(tu), "fp32_extended": lambda: _session(tu, "extended"),
        "fp32_saved_optimized": lambda: _session(scratch / "transunet.opt.onnx"),
        **{tag: (lambda t=tag: _session(scratch / f"transunet.{t}.onnx"))
           for tag in ("int8_conv_matmul", "int8_conv", "int8_all_ops")},
    }
    candidates["image_encoder"] = {
        "fp32": lambda: _session(enc), "fp32_extended": lambda: _session(enc, "extended"),
        "fp32_saved_optimized": lambda: _session(scratch / "image_encoder.opt.onnx"),
        "int8_matmul": lambda: _session(scratch / "image_encoder.int8_matmul.onnx"),
    }
    if fused is not None:
        candidates["image_encoder"]["fused_rel_pos"] = lambda: _session(fused)
        candidates["image_encoder"]["fused_rel_pos_int8_matmul"] = lambda: _session(
            scratch / "image_encoder.fused.int8_matmul.onnx")
    for tag, options in (("openvino_fp32", {"precision": "fp32"}), ("openvino_bf16", {"precision": "bf16"})):
        candidates["transunet"][tag] = lambda o=options: _OpenVINOGraph(dirs["fp32"], "transunet", o)
        candidates["image_encoder"][tag] = lambda o=options: _OpenVINOGraph(dirs["fp32"], "image_encoder", o)
    results: dict[str, Any] = {}
    for graph, makers in candidates.items():
        sessions = {name: make() for name, make in makers.items()}
        results[graph] = {}
        for batch in batch_sizes:
            feed = {k: np.concatenate([f[k] for f in feeds[graph][:batch]]) for k in feeds[graph][0]}
            want = sessions["fp32"].run(None, feed)[0]
            per: dict[str, list[tuple[float, float]]] = {name: [] for name in sessions}
            for r in range(rounds):
                names = list(sessions)
                names = names[r % len(names):] + names[:r % len(names)]
                for name in names:
                    per[name].append(_time_calls(sessions[name], feed, round_s))
            base = per["fp32"]
            results[graph][str(batch)] = {
                name: {"cpu_ms_median": _median([t[0] for t in times]),
                       "wall_ms_median": _median([t[1] for t in times]),
                       "cpu_ms_rounds": [round(t[0], 3) for t in times],
                       "speedup_median": _median([b[0] / t[0] for b, t in zip(base, times, strict=True)]),
                       "speedup_wall_median": _median([b[1] / t[1] for b, t in zip(base, times, strict=True)]),
                       "max_abs_diff_vs_fp32": float(np.max(np.abs(sessions[name].run(None, feed)[0] - want)))}
                for name, times in per.items()}
            _log(f"  {graph} b{batch}: " + ", ".join(
                f"{n} {v['speedup_median']:.2f}x" for n, v in results[graph][str(batch)].items()))
    return results


class _OpenVINOGraph:
    """One graph on the openvino engine behind the ``session.run(None, feed)`` call the timings make."""

    def __init__(self, art_dir: Path, graph: str, options: Mapping[str, Any]) -> None:
        from inference.engines import build_engine

        self.graph = graph
        self.engine = build_engine("openvino", art_dir, intra_op_threads=1, graphs=[graph], onnxruntime_graphs=[],
                                   **options)

    def run(self, _outputs: None, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        values = self.engine.run(self.graph, feed)
        return [values[name] for name in self.engine.output_names(self.graph)]


def _time_calls(session: Any, feed: Mapping[str, np.ndarray], seconds: float) -> tuple[float, float]:
    """(median CPU ms, median wall ms) per call over at least ``seconds`` and 3 calls, after a warm-up call.

    With one intra-op thread ONNX Runtime computes in the calling thread, so its CPU time is the work
    itself: unlike wall time it does not grow while other tenants hold the core. So does OpenVINO with one
    inference thread (97 % of the process's CPU time was the calling thread's).
    """
    session.run(None, dict(feed))
    cpu: list[float] = []
    wall: list[float] = []
    started = time.perf_counter()
    while time.perf_counter() - started < seconds or len(cpu) < 3:
        t, c = time.perf_counter(), time.thread_time()
        session.run(None, dict(feed))
        cpu.append((time.thread_time() - c) * 1000.0)
        wall.append((time.perf_counter() - t) * 1000.0)
    return _median(cpu), _median(wall)


# ------------------------------------------------------------------ held-out Dice
def heldout_dice(specs: Mapping[str, Spec], count: int) -> dict[str, Any]:
    """Per variant: mean Dice of the served masks against the truth, and mask Dice against fp32."""
    from export.parity import dice
    from inference.pipeline import SegmentOptions

    images, truth = _images(count)
    masks = {}
    for name, spec in specs.items():
        pipeline = _pipeline(spec, 1)
        masks[name] = [r.mask > 0 for r in pipeline.segment(images, SegmentOptions(outputs=("mask",)))]
    out: dict[str, Any] = {"seed": HELDOUT_SEED, "images": count, "kind": "ultrasound (lesion cases), 256 px"}
    for name, ms in masks.items():
        scores = [dice(m, t) for m, t in zip(ms, truth, strict=True)]
        agree = [dice(m, f) for m, f in zip(ms, masks["fp32"], strict=True)]
        out[name] = {"dice_mean": float(np.mean(scores)), "dice_vs_fp32_min": float(min(agree)),
                     "dice_vs_fp32_mean": float(np.mean(agree))}
    return out


# ------------------------------------------------------------------ the command
def run(args: argparse.Namespace) -> int:
    import tempfile

    from inference.manifest import load_manifest
    from weights.checkpoints import resolve_run_dir

    started = time.perf_counter()
    machine = machine_description()
    fp32_dir = Path(args.fp32)
    if load_manifest(fp32_dir).get("precision") != "fp32":
        raise SystemExit(f"--fp32 {fp32_dir}: not an fp32 artifact directory")
    temp = None
    if args.work is None:
        temp = tempfile.mkdtemp(prefix="medrefine-optimize-")
    work = Path(args.work or temp)
    try:
        names = args.variants
        unknown = sorted(set(names or ()) - set(VARIANTS) - set(ENGINE_VARIANTS))
        if unknown:
            raise SystemExit(f"--variants: unknown {unknown}; choose from {sorted({**VARIANTS, **ENGINE_VARIANTS})}")
        exported = None if names is None else [*names, *(ENGINE_VARIANTS[n][0] for n in names if n in ENGINE_VARIANTS)]
        dirs = build_variants(resolve_run_dir(args.model), fp32_dir, work, exported)
        specs = variant_specs(dirs, names)
        result: dict[str, Any] = {
            "format": "medrefine-optimize/1",
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": machine, "note": args.note,
            "config": {k: v for k, v in vars(args).items() if k not in ("func",)},
            "variants": {name: {"export_options": VARIANTS.get(name, {}), "backend": backend,
                                "engine_options": options, **_describe(d)}
                         for name, (d, backend, options) in specs.items()},
        }
        _log("held-out Dice ...")
        result["heldout"] = heldout_dice(specs, args.heldout)
        if not args.skip_graphs:
            _log("single graphs ...")
            result["graphs"] = graph_ab(dirs, work, args.batch_sizes, args.rounds, args.round_s)
        _log("pipeline ...")
        result["pipeline"] = pipeline_ab(specs, {"1p1t": (1, 1, list(specs))}, args.batch_sizes, args.rounds,
                                         args.round_s)
        chosen = choose_optimized(result, args.batch_sizes)
        if not args.skip_processes:  # the chosen variant on the machine's other configurations
            configs = {"1p2t": (1, 2, ["fp32", chosen["variant"]]), "2p1t": (2, 1, ["fp32", chosen["variant"]])}
            result["pipeline"].update(pipeline_ab(specs, configs, args.batch_sizes, args.rounds, args.round_s))
    finally:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)
    result.update(_verdict(result, args.batch_sizes, chosen))
    result["duration_s"] = round(time.perf_counter() - started, 1)
    result["machine"]["loadavg_1_5_15_end"] = list(os.getloadavg())
    out = Path(args.out) if args.out else (REPO_ROOT / "loadtest" / "results" /
                                            f"optimize-{machine_slug(machine)}-{datetime.now():%Y%m%d-%H%M}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, sort_keys=False) + "\n")
    _log(f"wrote {out}")
    print(json.dumps({k: result[k] for k in result if k.startswith(("optimized_", "best_"))}, indent=2))
    return 0


def _describe(art_dir: Path) -> dict[str, Any]:
    from inference.manifest import load_manifest

    manifest = load_manifest(art_dir)
    return {"version": manifest["version"], "precision": manifest["precision"],
            "graph_precision": {n: g.get("precision", manifest["precision"]) for n, g in manifest["graphs"].items()}}


def _ratio_basis(result: Mapping[str, Any]) -> tuple[bool, float]:
    """(shared machine?, other processes' median cores) over every 1p1t round."""
    base = result["pipeline"]["1p1t"]["variants"]
    others = [v for rows in base.values() for row in rows.values() for v in row["other_cores_rounds"]]
    return _median(others) > SHARED_CORES, _median(others)


def choose_optimized(result: Mapping[str, Any], batch_sizes: Sequence[int]) -> dict[str, Any]:
    """The optimised variant: the fastest at one process and one thread (geometric mean over ``batch_sizes`` of
    its ratio to fp32, on the verdict's basis) among those whose held-out Dice is at most ``MAX_DICE_DELTA``
    under fp32; ``{"variant", "rule", "candidates"}``."""
    shared, _ = _ratio_basis(result)
    key = "over_fp32_cpu_median" if shared else "over_fp32_median"
    base = result["pipeline"]["1p1t"]["variants"]
    held = result["heldout"]
    candidates: dict[str, Any] = {}
    for name, rows in base.items():
        if name == "fp32":
            continue
        ratios = [rows[str(b)][key] for b in batch_sizes]
        candidates[name] = {"heldout_dice_delta": round(held["fp32"]["dice_mean"] - held[name]["dice_mean"], 5),
                            "over_fp32_geomean": round(float(np.exp(np.mean(np.log(ratios)))), 3)}
    allowed = {n: c for n, c in candidates.items() if c["heldout_dice_delta"] <= MAX_DICE_DELTA}
    variant = max(allowed, key=lambda n: allowed[n]["over_fp32_geomean"]) if allowed else "fp32"
    return {"variant": variant, "candidates": candidates,
            "rule": f"fastest at 1p1t (geometric mean over batch sizes {list(batch_sizes)} of {key}) among variants "
                    f"whose held-out Dice is at most {MAX_DICE_DELTA} under fp32"}


def _verdict(result: Mapping[str, Any], batch_sizes: Sequence[int], chosen: Mapping[str, Any]) -> dict[str, Any]:
    """The top-level keys: the optimised pipeline (``chosen``, see :func:`choose_optimized`) against fp32 in
    today's configuration (1 process, 1 thread), and the best configuration on the machine against the same
    fp32 figure.

    ``optimized_over_fp32_offline_b*``: images per CPU-second when other processes took more than
    ``SHARED_CORES`` cores on average (on a shared machine wall-clock throughput measures the neighbours;
    with one thread a quiet machine's images per second equal its images per CPU-second), else wall-clock
    images per second. ``ratio_basis`` says which; both are in ``pipeline``.
    """
    pipe = result["pipeline"]
    base = pipe["1p1t"]["variants"]
    optimized = chosen["variant"]
    shared, others = _ratio_basis(result)
    verdict: dict[str, Any] = {"optimized_variant": optimized, "optimized_choice": dict(chosen),
                               "ratio_basis": "images per CPU-second (shared machine, median other processes "
                                              f"{others:.2f} cores)" if shared else "images per second"}
    for b in batch_sizes:
        row = base[optimized][str(b)]
        verdict[f"optimized_over_fp32_offline_b{b}"] = round(row["over_fp32_cpu_median" if shared else
                                                                "over_fp32_median"], 3)
        verdict[f"optimized_over_fp32_offline_b{b}_wall"] = round(row["over_fp32_median"], 3)
    for b in batch_sizes:
        fp32 = base["fp32"][str(b)]["ips_median"]
        best = max(((cfg, block["variants"][optimized][str(b)]["ips_median"]) for cfg, block in pipe.items()
                    if optimized in block["variants"]), key=lambda item: item[1])
        verdict[f"best_config_b{b}"] = {"config": best[0], "ips": round(best[1], 2),
                                        "over_fp32_1p1t": round(best[1] / fp32, 3)}
    held = result["heldout"]
    verdict["optimized_heldout_dice_delta"] = round(held["fp32"]["dice_mean"] - held[optimized]["dice_mean"], 5)
    return verdict
