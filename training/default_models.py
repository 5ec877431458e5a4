"""``python -m training default-models --out checkpoints/default``: the committed default UltraRefiner."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from core.datasets import SegmentationDataset
from weights.checkpoints import RUN_JSON, WEIGHTS_FILE, load_run

log = logging.getLogger("training.default_models")

MAX_WEIGHTS_MB = 25.0
DATA_KIND = "ultrasound_mixed"
COMMAND_JSON = "command.json"  # beside a phase run in --work: the argv that wrote it and its wall time


def add_arguments(parser: argparse.ArgumentParser, command_name: str = "default-models") -> None:
    parser.add_argument("--out", default="checkpoints/default", help="final run directory")
    parser.add_argument("--work", help="intermediate runs and data (default: OUT/../default_work)")
    parser.add_argument("--n-train", type=int, default=240)
    parser.add_argument("--n-val", type=int, default=40)
    parser.add_argument("--n-test", type=int, default=60)
    parser.add_argument("--n-calib", type=int, default=120, help="calibration split for needs_review / no finding")
    parser.add_argument("--size", type=int, default=256, help="phantom side in pixels (the default preset's size)")
    parser.add_argument("--data-seed", type=int, default=1000, help="train/val/test use this seed +0/+1/+2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", default="default", help="run preset of all three phases")
    parser.add_argument("--kind", default=DATA_KIND, help="phantom kind of all three splits (core.phantoms.KINDS)")
    parser.add_argument("--transunet-epochs", type=int, default=24)
    parser.add_argument("--refiner-epochs", type=int, default=16)
    parser.add_argument("--e2e-epochs", type=int, default=3,
                        help="phase 3 epochs; 0 = package phases 1 + 2 as the final model (no phase 3)")
    parser.add_argument("--real-ratio", type=float, default=0.5)
    parser.add_argument("--augmentor-preset", default="default")
    parser.add_argument("--max-steps", type=int, help="cap every phase's optimiser steps (smoke tests)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int,
                        help="torch CPU threads (default: torch's choice; 1 helps on a busy machine)")
    parser.add_argument("--keep-work", action="store_true", help="keep the intermediate runs and data")
    parser.add_argument("--reuse", action="store_true",
                        help="keep data and phase runs in --work made by the same command (implies --keep-work)")


def _write_data(work: Path, args: argparse.Namespace) -> dict[str, Path]:
    from core.phantoms import write_dataset

    dirs = {}
    splits = (("train", args.n_train), ("val", args.n_val), ("test", args.n_test), ("calib", args.n_calib))
    for offset, (split, n) in enumerate(splits):
        out = work / "data" / split
        spec = {"kind": args.kind, "n": n, "seed": args.data_seed + offset, "size": args.size}
        dirs[split] = out
        if args.reuse and _recorded(out) == spec:
            continue
        if out.exists():
            shutil.rmtree(out)
        write_dataset(args.kind, n, out, args.data_seed + offset, size=args.size)
        (out / COMMAND_JSON).write_text(json.dumps(spec) + "\n")
    return dirs


def _recorded(run_dir: Path) -> Any:
    """What ``command.json`` in ``run_dir`` records (None when absent or unreadable)."""
    try:
        return json.loads((run_dir / COMMAND_JSON).read_text())
    except (OSError, ValueError):
        return None


def _portable(obj: Any, work: Path) -> Any:
    """``obj`` with the (temporary) work directory in every string replaced by ``<work>``."""
    if isinstance(obj, dict):
        return {k: _portable(v, work) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_portable(v, work) for v in obj]
    if isinstance(obj, str):
        return obj.replace(str(work), "<work>")
    return obj


def make_portable(out: Path, work: Path) -> None:
    """Rewrite ``out/run.json`` (and ``recipe.json``/``eval_test.json`` if present) without work-dir paths."""
    for name in (RUN_JSON, "recipe.json", "eval_test.json"):
        path = out / name
        if path.is_file():
            path.write_text(json.dumps(_portable(json.loads(path.read_text()), work), indent=2) + "\n")


def package_phases(transunet_run: Path, refiner_run: Path, out: Path) -> Path:
    """The phase-1 TransUNet and the phase-2 refiner as one ``"ultrarefiner"`` run in ``out`` (``--e2e-epochs 0``).

    Phase 2 already tuned its gate, thresholds and review / no-finding choices on the real phase-1 predictions
    of the validation split, i.e. on exactly this model's outputs, so run.json keeps them; log.csv and
    curves.png are phase 2's.
    """
    from weights.checkpoints import build_model_from_run, save_run

    info = load_run(refiner_run)
    model = build_model_from_run(info, transunet_run=transunet_run)
    standard = {"format", "kind", "config", "threshold", "metrics", "data_fingerprint", "phase", "seed", "created",
                "code_version", "weights", "weights_sha256", "sources"}
    extra = {k: v for k, v in info.raw.items() if k not in standard}
    if out.exists():
        shutil.rmtree(out)
    save_run(out, model, model.config_dict(), info.threshold, info.metrics, kind="ultrarefiner", phase="refiner",
             seed=info.seed, data_fingerprint=info.data_fingerprint,
             sources={"transunet": str(transunet_run), "refiner": str(refiner_run)}, extra=extra)
    for fname in ("log.csv", "curves.png"):
        shutil.copy2(refiner_run / fname, out / fname)
    return out


def _loadavg() -> list[float]:
    """The machine's 1, 5 and 15 minute load averages now (how busy the shared machine was)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def benchmark_step_seconds(steps: int = 4) -> float:
    """Median seconds of one training step of the default TransUNet (batch 8, 128 px) on this machine now.

    Recorded in recipe.json so wall times measured on a busy or different machine can be compared.
    """
    from models.build import build_transunet

    torch.manual_seed(0)
    model = build_transunet("default")
    opt = torch.optim.AdamW(model.parameters(), 1e-4)
    x = torch.rand(8, 1, 128, 128)
    times = []
    for _ in range(steps + 1):
        t = time.time()
        opt.zero_grad()
        model(x).mean().backward()
        opt.step()
        times.append(time.time() - t)
    return float(sorted(times[1:])[len(times[1:]) // 2])


def run(args: argparse.Namespace) -> int:
    from training.__main__ import main
    from training.evaluate import evaluate_run, format_summary

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    work = Path(args.work) if args.work else out.parent / f"{out.name}_work"
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    cpu: dict[str, float] = {}  # process CPU time per step: with --threads 1, an idle machine's wall time
    load: dict[str, list[float]] = {"start": _loadavg()}

    bench = benchmark_step_seconds()
    t, c = time.time(), time.process_time()
    data = _write_data(work, args)
    timings["data"], cpu["data"] = time.time() - t, time.process_time() - c

    common = ["--data", str(data["train"]), "--val-data", str(data["val"]), "--config", args.config,
              "--seed", str(args.seed), "--device", args.device, "--no-progress"]
    if args.max_steps:
        common += ["--max-steps", str(args.max_steps)]
    runs = {name: work / name for name in ("transunet", "refiner", "e2e")}
    commands = {
        "transunet": ["transunet", "--out", str(runs["transunet"]), "--epochs", str(args.transunet_epochs), *common],
        "refiner": ["refiner", "--out", str(runs["refiner"]), "--epochs", str(args.refiner_epochs),
                    "--transunet", str(runs["transunet"]), "--real-ratio", str(args.real_ratio),
                    "--augmentor-preset", args.augmentor_preset, *common],
        "e2e": ["e2e", "--out", str(runs["e2e"]), "--epochs", str(args.e2e_epochs),
                "--init", str(runs["transunet"]), str(runs["refiner"]), *common],
    }
    if args.e2e_epochs == 0:  # phase 3 skipped: the final model is phases 1 + 2 packaged (see package_phases)
        commands.pop("e2e")
    phase_metrics: dict[str, Any] = {}
    for name, argv in commands.items():
        recorded = _recorded(runs[name]) if args.reuse else None
        if recorded is not None and recorded.get("argv") == argv and (runs[name] / WEIGHTS_FILE).is_file():
            log.info("default-models: %s reused from %s (same command)", name, runs[name])
            timings[name] = float(recorded["seconds"])
            cpu[name] = float(recorded.get("cpu_seconds", float("nan")))
            load[name] = recorded.get("loadavg", [])
        else:
            t, c = time.time(), time.process_time()
            log.info("default-models: python -m training %s", " ".join(argv))
            main(argv)
            timings[name], cpu[name], load[name] = time.time() - t, time.process_time() - c, _loadavg()
            (runs[name] / COMMAND_JSON).write_text(json.dumps(
                {"argv": argv, "seconds": timings[name], "cpu_seconds": cpu[name], "loadavg": load[name]}) + "\n")
        phase_metrics[name] = load_run(runs[name]).metrics
        log.info("default-models: %s done in %.0f s", name, timings[name])

    if "e2e" not in commands:
        t, c = time.time(), time.process_time()
        package_phases(runs["transunet"], runs["refiner"], runs["e2e"])
        timings["e2e"], cpu["e2e"] = time.time() - t, time.process_time() - c
    # The final run directory: the e2e run, copied.
    out.mkdir(parents=True, exist_ok=True)
    for fname in (RUN_JSON, WEIGHTS_FILE, "log.csv", "curves.png"):
        shutil.copy2(runs["e2e"] / fname, out / fname)
    weights_mb = (out / WEIGHTS_FILE).stat().st_size / 2**20
    if weights_mb > MAX_WEIGHTS_MB:
        raise RuntimeError(f"{out / WEIGHTS_FILE}: {weights_mb:.1f} MB exceeds the {MAX_WEIGHTS_MB} MB budget")

    t, c = time.time(), time.process_time()
    main(["calibrate", "--run", str(out), "--data", str(data["calib"]), "--device", args.device])
    timings["calibrate"], cpu["calibrate"] = time.time() - t, time.process_time() - c
    t, c = time.time(), time.process_time()
    result = evaluate_run(out, SegmentationDataset(data["test"]), device=args.device)
    result["data"] = f"phantom {args.kind} test set ({args.n_test} cases, seed {args.data_seed + 2}, {args.size} px)"
    (out / "eval_test.json").write_text(json.dumps(result, indent=2) + "\n")
    timings["evaluate"], cpu["evaluate"] = time.time() - t, time.process_time() - c
    load["end"] = _loadavg()
    # Phases reused from --work count with their recorded wall and CPU time, so "total" is the whole recipe's.
    timings["total"] = sum(timings.values())
    cpu["total"] = sum(cpu.values())
    print(format_summary(result))

    recipe = {
        "commands": {**{k: "python -m training " + " ".join(v) for k, v in commands.items()},
                     "calibrate": f"python -m training calibrate --run {out} --data {data['calib']}"},
        "data": {"kind": args.kind, "size": args.size, "n_train": args.n_train, "n_val": args.n_val,
                 "n_test": args.n_test, "n_calib": args.n_calib,
                 "seeds": [args.data_seed, args.data_seed + 1, args.data_seed + 2, args.data_seed + 3]},
        "seconds": {k: round(v, 1) for k, v in timings.items()},
        "cpu_seconds": {k: round(v, 1) for k, v in cpu.items()},
        "loadavg_1_5_15min": load,
        "threads": torch.get_num_threads(),
        "benchmark_step_seconds": round(bench, 3),
        "weights_mb": round(weights_mb, 2),
        "phase_val_metrics": {
            k: {m: v for m, v in metrics.items() if not m.startswith("threshold_sweep")}
            for k, metrics in phase_metrics.items()
        },
        "test": {
            "coarse_dice": result["coarse"]["mean"]["dice"],
            "refined_dice": result["refined"]["mean"]["dice"],
            "hard_cases": result["hard_cases"],
            "refined_vs_coarse": result["refined_vs_coarse"],
        },
    }
    (out / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
    make_portable(out, work)
    log.info("default-models: wrote %s in %.0f s", out, timings["total"])
    if not (args.keep_work or args.reuse):
        shutil.rmtree(work, ignore_errors=True)
    return 0
