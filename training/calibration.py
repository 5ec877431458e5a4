"""Validation choices behind an answer's ``lesion_found`` and ``needs_review`` and the automatic answer's rules
(flip-averaged coarse pass, largest component), stored in run.json."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.metrics import dice_per_case
from models.postprocess import flip_average, keep_largest_component

log = logging.getLogger("training.calibration")
CALIBRATION_SEED = 5150  # the seeded box and click prompts of the calibration answers

REVIEW_DICE = 0.7  # a case "needs review" when its Dice with the truth is below this
# Dice 0.7 <=> IoU 0.7 / 1.3: the threshold of a calibrated IoU head, used when validation has too few bad cases.
CALIBRATED_IOU_THRESHOLD = REVIEW_DICE / (2 - REVIEW_DICE)
MIN_AREA_FRACTIONS = (0.0, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.012, 0.016)
MIN_CASES = 2  # bad and good validation cases each needed to fit the review threshold
# Answers below Dice 0.7 are rare (2 of 314 in the default calibration split): too few to place a threshold, so
# with fewer than MIN_BAD_TO_FIT of them the threshold is fitted on answers below FALLBACK_FIT_DICE instead.
MIN_BAD_TO_FIT = 10
FALLBACK_FIT_DICE = 0.8
# The flip-averaged coarse pass costs a second TransUNet pass per image: it is chosen only when it gains at least
# this much mean calibration Dice (the largest-component rule costs nothing and is chosen when it gains at all).
COARSE_FLIP_MIN_GAIN = 0.001


def case_dice(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Per-case Dice (N,) float32 of binary (N, 1, H, W) masks (``core.metrics.dice_per_case``)."""
    return torch.from_numpy(dice_per_case(pred > 0.5, gt > 0.5)).float()


def largest_components(masks: torch.Tensor) -> torch.Tensor:
    """Binary masks (N, 1, H, W) with each reduced to its largest 8-connected component."""
    kept = [torch.from_numpy(keep_largest_component(m[0].numpy())) for m in masks]
    return torch.stack(kept)[:, None] if kept else masks


def final_masks(refined: torch.Tensor, threshold: float, fraction: float, largest_component: bool) -> torch.Tensor:
    """The served automatic masks (N, 1, H, W) {0, 1} from refined probabilities: ``> threshold``, the largest
    component when chosen, then masks under ``fraction`` of the image emptied."""
    binary = (refined > threshold).float()
    if largest_component:
        binary = largest_components(binary)
    return apply_min_area(binary, fraction)


def apply_min_area(masks: torch.Tensor, fraction: float) -> torch.Tensor:
    """Binary masks (N, 1, H, W) with those under ``fraction`` of the image area emptied."""
    area = masks.flatten(1).float().sum(1)
    keep = area >= fraction * masks.shape[-1] * masks.shape[-2]
    return masks * keep.view(-1, 1, 1, 1).to(masks.dtype)


def roc_auc(score: np.ndarray, positive: np.ndarray) -> float | None:
    """Area under the ROC curve of ``score`` (higher = more likely positive); None without both classes.
    Ties count one half (the Mann-Whitney statistic)."""
    pos, neg = score[positive], score[~positive]
    if len(pos) == 0 or len(neg) == 0:
        return None
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def choose_review_threshold(pred_iou: np.ndarray, dice: np.ndarray, fit_dice: float = REVIEW_DICE) -> dict[str, Any]:
    """The predicted-IoU threshold below which a case is flagged, from validation cases.

    Args:
        pred_iou: (N,) the IoU head's predictions.
        dice: (N,) the actual Dice of each final mask.
        fit_dice: the threshold maximises Youden's J for catching answers below this Dice (``REVIEW_DICE`` or,
            with too few such answers, ``FALLBACK_FIT_DICE``); the reported figures are for ``REVIEW_DICE``.

    Returns:
        ``{"iou_threshold", "method", "dice_below", "fit_dice_below", "val": {sensitivity, specificity, auroc,
        n_bad, n}}``.
    """
    bad = dice < fit_dice
    n_bad, n_good = int(bad.sum()), int((~bad).sum())
    if n_bad >= MIN_CASES and n_good >= MIN_CASES:
        candidates = np.unique(np.concatenate([pred_iou, [CALIBRATED_IOU_THRESHOLD]]))
        best_j, threshold = -2.0, CALIBRATED_IOU_THRESHOLD
        for t in candidates + 1e-6:  # flag pred_iou < t, so t just above each candidate
            flagged = pred_iou < t
            j = flagged[bad].mean() + (~flagged[~bad]).mean() - 1
            if j > best_j + 1e-12:
                best_j, threshold = float(j), float(t)
        method = "youden_j"
    else:
        threshold, method = CALIBRATED_IOU_THRESHOLD, "calibrated_iou_for_dice_0.7"
    flagged = pred_iou < threshold
    bad = dice < REVIEW_DICE
    n_bad, n_good = int(bad.sum()), int((~bad).sum())
    return {
        "iou_threshold": round(threshold, 6), "method": method, "dice_below": REVIEW_DICE, "fit_dice_below": fit_dice,
        "val": {
            "n": int(len(dice)), "n_bad": n_bad,
            "sensitivity": float(flagged[bad].mean()) if n_bad else None,
            "specificity": float((~flagged[~bad]).mean()) if n_good else None,
            "auroc": roc_auc(-pred_iou, bad),
        },
    }


def min_area_scores(refined: torch.Tensor, masks: torch.Tensor, threshold: float,
                    largest_component: bool = False) -> dict[float, float]:
    """Mean Dice over all cases (lesion-free ones count 1 when answered empty) per ``MIN_AREA_FRACTIONS``."""
    binary = final_masks(refined, threshold, 0.0, largest_component)
    return {f: float(case_dice(apply_min_area(binary, f), masks).mean()) for f in MIN_AREA_FRACTIONS}


def calibrate_answers(probs: dict[str, torch.Tensor], masks: torch.Tensor, threshold: float,
                      largest_component: bool = False, other_passes: tuple[torch.Tensor, ...] = ()) -> dict[str, Any]:
    """Choose ``no_finding`` and ``review`` on validation (module docstring).

    Args:
        probs: ``"refined"`` (N, 1, H, W) final probabilities and ``"iou"`` (N, 1) predicted IoU.
        masks: (N, 1, H, W) ground truth {0, 1} (empty for normal cases).
        threshold: the final mask's probability threshold.
        largest_component: masks are reduced to their largest component before the minimum area.
        other_passes: refined probabilities (N, 1, H, W) of the same cases from other coarse passes; their
            answers join the minimum-area choice (see ``calibrate_run``).

    Returns:
        ``{"no_finding": {...}, "review": {...}}`` for run.json.
    """
    binary = final_masks(probs["refined"], threshold, 0.0, largest_component)
    pooled = torch.cat([probs["refined"], *other_passes])
    scores = min_area_scores(pooled, masks.repeat(1 + len(other_passes), 1, 1, 1), threshold, largest_component)
    best = max(scores.values())
    fraction = min(f for f, v in scores.items() if v >= best - 1e-9)
    final = apply_min_area(binary, fraction)
    normal = masks.flatten(1).amax(1) <= 0.5
    found = final.flatten(1).amax(1) > 0
    no_finding = {
        "min_area_fraction": fraction,
        "val_dice": {f"{f:g}": round(v, 6) for f, v in scores.items()},
        "val_passes": 1 + len(other_passes),
        "val_normal_cases": int(normal.sum()),
        "val_normal_false_positive_rate": float(found[normal].float().mean()) if normal.any() else None,
    }
    dice = case_dice(final, masks).numpy()
    review = choose_review_threshold(probs["iou"][:, 0].numpy().astype(np.float64), dice)
    return {"no_finding": no_finding, "review": review}


def calibrate_answers_with_prompts(
    probs: dict[str, torch.Tensor], masks: torch.Tensor, threshold: float,
    interactive: tuple[np.ndarray, np.ndarray], largest_component: bool = False,
    other_passes: tuple[torch.Tensor, ...] = (),
) -> dict[str, Any]:
    """``calibrate_answers`` with the review threshold fitted on the automatic answers plus the interactive
    ones (``interactive`` = (predicted IoU (M,), Dice (M,)) of /refine-style answers)."""
    out = calibrate_answers(probs, masks, threshold, largest_component, other_passes)
    binary = final_masks(probs["refined"], threshold, out["no_finding"]["min_area_fraction"], largest_component)
    dice = np.concatenate([case_dice(binary, masks).numpy(), interactive[1]])
    pred = np.concatenate([probs["iou"][:, 0].numpy().astype(np.float64), interactive[0]])
    fit = REVIEW_DICE if int((dice < REVIEW_DICE).sum()) >= MIN_BAD_TO_FIT else FALLBACK_FIT_DICE
    out["review"] = choose_review_threshold(pred, dice, fit)
    out["review"]["answers"] = "automatic + box + click"
    return out


@torch.no_grad()
def flip_averaged_coarse(model: Any, images: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """Coarse probabilities (N, 1, H, W) in [0, 1] from the mean of the TransUNet's logits on each image and on
    its left-right mirror (mirrored back): the served ``coarse_flip`` rule."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(images), batch_size):
        image = images[i : i + batch_size].to(device)
        out.append(torch.sigmoid(flip_average(model.coarse(image), model.coarse(image.flip(-1)))).cpu())
    return torch.cat(out)


def choose_segment_rules(
    candidates: dict[bool, dict[str, torch.Tensor]], masks: torch.Tensor, threshold: float
) -> dict[str, Any]:
    """The automatic answer's rules by mean calibration Dice (each with its best minimum area).

    Args:
        candidates: ``{coarse_flip: predict_ultrarefiner output}`` for False (one pass) and True (flip-averaged).
        masks: (N, 1, H, W) ground truth {0, 1}.
        threshold: the served probability threshold.

    Returns:
        ``{"coarse_flip", "largest_component", "val_dice": {rule name: Dice}, "coarse_flip_min_gain"}``: the
        largest component where it gains at all, the flip pass where it gains ``COARSE_FLIP_MIN_GAIN`` more.
    """
    def best(flip: bool, largest: bool) -> float:
        return max(min_area_scores(candidates[flip]["refined"], masks, threshold, largest).values())

    scores = {(flip, largest): best(flip, largest) for flip in sorted(candidates) for largest in (False, True)}
    largest = {flip: scores[flip, True] > scores[flip, False] + 1e-9 for flip in sorted(candidates)}
    flip = True in candidates and scores[True, largest[True]] >= scores[False, largest[False]] + COARSE_FLIP_MIN_GAIN
    names = {(False, False): "plain", (False, True): "largest_component", (True, False): "coarse_flip",
             (True, True): "coarse_flip+largest_component"}
    return {"coarse_flip": bool(flip), "largest_component": bool(largest[flip]),
            "val_dice": {names[k]: round(v, 6) for k, v in scores.items()},
            "coarse_flip_min_gain": COARSE_FLIP_MIN_GAIN}


@torch.no_grad()
def interactive_answers(model: Any, images: torch.Tensor, masks: torch.Tensor, threshold: float,
                        batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(predicted IoU, Dice) of /refine's framing on every lesion case with a jittered box and with one
    click (``training.interactive``; seeded), thresholded at ``threshold`` as the service does."""
    from training.interactive import PromptBatch, _inside, _pick, interactive_forward, jittered_box

    rng = np.random.default_rng(CALIBRATION_SEED)
    lesion = masks.flatten(1).amax(1) > 0.5
    images, masks = images[lesion], masks[lesion]
    preds, dices = [], []
    for i in range(0, len(images), batch_size):
        image, mask = images[i : i + batch_size], masks[i : i + batch_size]
        gt = mask[:, 0].numpy() > 0.5
        b, h, w = gt.shape
        none = torch.zeros(b)
        boxes = torch.from_numpy(np.stack([jittered_box(m, rng) for m in gt]))
        clicks = torch.from_numpy(np.stack([_pick(_inside(m), rng) for m in gt]))[:, None]
        for prompts in (
            PromptBatch(torch.zeros(b, 1, 2), -torch.ones(b, 1), boxes, torch.ones(b, dtype=torch.bool),
                        torch.zeros(b, 1, h, w), none, ["box"] * b),
            PromptBatch(clicks, torch.ones(b, 1), torch.zeros(b, 4), torch.zeros(b, dtype=torch.bool),
                        torch.zeros(b, 1, h, w), none, ["point"] * b),
        ):
            prob, pred = interactive_forward(model, image, prompts)
            preds.append(pred[:, 0].numpy().astype(np.float64))
            dices.append(case_dice((prob > threshold).float(), mask).numpy())
    return np.concatenate(preds), np.concatenate(dices)


def calibrate_run(run_dir: str | Path, data: str | Path, device: str = "cpu") -> dict[str, Any]:
    """Remake ``segment``, ``no_finding`` and ``review`` of an ultrarefiner run on the calibration split ``data``
    and write them into its run.json (the weights are untouched); returns them."""
    from core.datasets import SegmentationDataset
    from training.phases import load_arrays, predict_ultrarefiner
    from weights.checkpoints import RUN_JSON, build_model_from_run, load_run, resolve_run_dir

    info = load_run(resolve_run_dir(run_dir))
    if info.kind != "ultrarefiner":
        raise ValueError(f"{info.run_dir}/{RUN_JSON}: kind {info.kind!r}; calibrate needs an 'ultrarefiner' run")
    model = build_model_from_run(info, device=device).eval()
    arrays = load_arrays(SegmentationDataset(data))
    threshold = float(info.threshold)
    candidates = {False: predict_ultrarefiner(model, arrays.images),
                  True: predict_ultrarefiner(model, arrays.images, flip_averaged_coarse(model, arrays.images))}
    segment = choose_segment_rules(candidates, arrays.masks, threshold)
    interactive = interactive_answers(model, arrays.images, arrays.masks, threshold)
    # The minimum area guards against small blobs on lesion-free images. The flip-averaged pass shows none on the
    # calibration split's lesion-free cases (every area ties, so alone it would drop the rule) although it still
    # makes them (7 of 80 further lesion-free phantoms, up to 925 px): both passes' answers choose it.
    chosen = candidates[segment["coarse_flip"]]
    others = tuple(c["refined"] for flip, c in candidates.items() if flip != segment["coarse_flip"])
    answers = calibrate_answers_with_prompts(chosen, arrays.masks, threshold, interactive,
                                             segment["largest_component"], others)
    answers["segment"] = segment
    normal = int((arrays.masks.flatten(1).amax(1) <= 0.5).sum())
    answers["calibration"] = {"data": str(data), "cases": len(arrays), "normal_cases": normal,
                              "interactive_answers": len(interactive[0])}
    path = Path(info.run_dir) / RUN_JSON
    record = json.loads(path.read_text())
    record.update(answers)
    path.write_text(json.dumps(record, indent=2) + "\n")
    log.info("calibrate: %s on %s: coarse_flip %s, largest_component %s, min_area_fraction %g, review iou < %.3f "
             "(%s)", info.run_dir, data, segment["coarse_flip"], segment["largest_component"],
             answers["no_finding"]["min_area_fraction"], answers["review"]["iou_threshold"],
             answers["review"]["method"])
    return answers


def add_arguments(parser: argparse.ArgumentParser, command_name: str = "calibrate") -> None:
    parser.add_argument("--run", required=True, help="ultrarefiner run directory whose run.json is updated")
    parser.add_argument("--data", required=True, help="calibration split (images/ + masks/, with normal cases)")
    parser.add_argument("--device", default="cpu")


def run(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    answers = calibrate_run(args.run, args.data, args.device)
    print(json.dumps({k: answers[k] for k in ("segment", "no_finding", "review")}, indent=1))
    return 0
