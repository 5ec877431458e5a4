"""``python -m training evaluate --data DIR --model RUN_DIR --json OUT.json``: coarse vs refined metrics.
(Details: docs/architecture.md, "training".)
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.datasets import SegmentationDataset
from core.metrics import METRIC_NAMES, SegmentationMetrics
from weights.checkpoints import build_model_from_run, load_run, resolve_run_dir

log = logging.getLogger("training.evaluate")

HARD_CASE_DICE = 0.8


def add_arguments(parser: argparse.ArgumentParser, command_name: str = "evaluate") -> None:
    parser.add_argument("--data", help="folder or ZIP with images/ + masks/ (default: held-out phantom set)")
    parser.add_argument("--model", default="default", help="run directory ('default' = checkpoints/default)")
    parser.add_argument("--transunet", help="phase-1 run to pair with a 'refiner' run (default: its sources)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--hard-dice", type=float, default=HARD_CASE_DICE,
                        help="cases with coarse Dice below this are summarised as hard cases")
    parser.add_argument("--phantom-count", type=int, default=60)
    parser.add_argument("--phantom-seed", type=int, default=2, help="seed of the default phantom test set")
    parser.add_argument("--phantom-size", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def _summary(metrics: SegmentationMetrics) -> dict[str, Any]:
    report = metrics.aggregate()
    return {
        "mean": {k: report.means[k] for k in METRIC_NAMES},
        "std": {k: report.stds[k] for k in METRIC_NAMES},
        "per_case": report.cases,
    }


def _mean_of(cases: list[dict[str, Any]], names: set[str]) -> dict[str, float] | None:
    chosen = [c for c in cases if c["name"] in names]
    if not chosen:
        return None
    return {k: float(np.mean([c[k] for c in chosen])) for k in METRIC_NAMES}


@torch.no_grad()
def evaluate_run(
    run_dir: str | Path,
    dataset: SegmentationDataset,
    *,
    transunet_run: str | Path | None = None,
    device: str = "cpu",
    hard_dice: float = HARD_CASE_DICE,
) -> dict[str, Any]:
    """Segment every case of ``dataset`` with the run's model; returns the JSON-ready result (module doc)."""
    from training.phases import transunet_logits

    info = load_run(resolve_run_dir(run_dir))
    model = build_model_from_run(info, transunet_run=transunet_run, device=device)
    thresholds = dict(info.raw.get("thresholds") or {})
    t_refined = float(info.threshold)
    t_coarse = float(thresholds.get("coarse", info.threshold))
    coarse_m, refined_m = SegmentationMetrics(threshold=t_coarse), SegmentationMetrics(threshold=t_refined)
    has_refiner = info.kind != "transunet"
    for sample in dataset:
        image = torch.from_numpy(np.asarray(sample.image, dtype=np.float32))[None, None].to(device)
        gt = np.asarray(sample.mask)[None]
        if has_refiner:
            out = model(image)
            coarse_m.update(out["coarse_mask"][:, 0].cpu().numpy(), gt, names=[sample.name])
            refined_m.update(out["refined_mask"][:, 0].cpu().numpy(), gt, names=[sample.name])
        else:
            prob = torch.sigmoid(transunet_logits(model, image))
            coarse_m.update(prob[:, 0].cpu().numpy(), gt, names=[sample.name])
    coarse = _summary(coarse_m)
    refined = _summary(refined_m) if has_refiner else None
    hard = {c["name"] for c in coarse["per_case"] if c["dice"] < hard_dice}
    result: dict[str, Any] = {
        "model": str(info.run_dir),
        "kind": info.kind,
        "weights_sha256": info.weights_sha256,
        "data": dataset.label,
        "n_cases": len(coarse["per_case"]),
        "thresholds": {"coarse": t_coarse, "refined": t_refined if has_refiner else None},
        "coarse": coarse,
        "refined": refined,
        "hard_cases": {
            "criterion": f"coarse dice < {hard_dice:g}",
            "count": len(hard),
            "names": sorted(hard),
            "coarse": _mean_of(coarse["per_case"], hard),
            "refined": _mean_of(refined["per_case"], hard) if refined else None,
        },
    }
    if refined is not None:
        deltas = np.array([r["dice"] - c["dice"] for r, c in zip(refined["per_case"], coarse["per_case"], strict=True)])
        result["refined_vs_coarse"] = {
            "improved": int((deltas > 1e-6).sum()),
            "worsened": int((deltas < -1e-6).sum()),
            "unchanged": int((np.abs(deltas) <= 1e-6).sum()),
            "mean_dice_delta": float(deltas.mean()),
        }
    return result


def format_summary(result: dict[str, Any]) -> str:
    lines = [f"{result['model']} ({result['kind']}) on {result['data']}: {result['n_cases']} cases"]
    for part in ("coarse", "refined"):
        if result[part] is not None:
            m = result[part]["mean"]
            lines.append(f"  {part:8s} " + "  ".join(f"{k}={m[k]:.4f}" for k in METRIC_NAMES))
    hard = result["hard_cases"]
    if hard["count"]:
        line = f"  hard cases ({hard['criterion']}): {hard['count']}, coarse dice {hard['coarse']['dice']:.4f}"
        if hard["refined"]:
            line += f", refined dice {hard['refined']['dice']:.4f}"
        lines.append(line)
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.data:
        source = args.data
    else:
        from training.phases import phantom_dataset

        source = str(phantom_dataset(args.phantom_count, args.phantom_seed, args.phantom_size))
    dataset = SegmentationDataset(source)
    result = evaluate_run(args.model, dataset, transunet_run=args.transunet, device=args.device,
                          hard_dice=args.hard_dice)
    print(format_summary(result))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        log.info("wrote %s", path)
    return 0
