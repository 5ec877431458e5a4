"""The ratings loop measured end to end: simulated ratings stored through the platform, a reward model, a
reward-weighted fine-tune, and the fine-tuned generator against the base on new prompts and seeds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform as host
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

_HELP = """The ratings loop (docs/rlhf.md), in one process over a private platform data directory:

  0. calibrate the simulated rater's 1-5 scale on --n-calibration base images (their own prompts and seeds);
  1. generate --n-ratings images from the base generators (training prompts, training seeds);
  2. rate each 1-5 with the simulated rater and store it with medplatform.feedback.save_generation_rating;
  3. read the ratings back (list_generation_ratings), regenerate each image from its stored identity, train
     the reward model, fine-tune the text-to-image model with reward-weighted regression (training.rlhf),
     and write the new generators directory (and, with --export, its ONNX artifacts);
  4. on NEW prompts and seeds: the fine-tuned image against the base image of the same prompt and seed under
     the simulated rater (win rate), modality accuracy, selector-feature Frechet distance to real phantoms.

    python -m loadtest rlhf --out loadtest/results/rlhf.json [--n-ratings 300] [--n-eval 200] [--threads 1]
"""

REPO_ROOT = Path(__file__).resolve().parent.parent
SEEDS = {"ratings": 300_000, "eval": 400_000, "calibration": 500_000, "prompts": 7}  # disjoint noise-seed ranges
GENERATION = {"steps": 25, "guidance_scale": 1.5}  # the service's defaults


def prompt_split(modalities: Sequence[str], count_tokens: Any, max_tokens: int, seed: int = SEEDS["prompts"]
                 ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Every caption variant (training.text2image.prompt_variants of each modality + finding phantom caption)
    that fits the text encoder, shuffled and split in two halves: ``(training prompts, evaluation prompts)``,
    each a list of ``(prompt, modality)``; no prompt text is in both."""
    from core.phantoms import FINDINGS, MODALITY_LABELS
    from training.text2image import prompt_variants

    pairs = {}
    for modality in modalities:
        for finding in FINDINGS[modality]:
            for variant in prompt_variants(f"{MODALITY_LABELS[modality]}, {finding}"):
                if count_tokens(variant) <= max_tokens:
                    pairs.setdefault(variant, modality)
    items = sorted(pairs.items())
    order = np.random.default_rng(seed).permutation(len(items))
    shuffled = [items[i] for i in order]
    half = len(shuffled) // 2
    return shuffled[:half], shuffled[half:]


def calibration_split(prompts: Sequence[tuple[str, str]], fraction: float
                      ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """``(calibration prompts, the rest)``: the first ``fraction`` of each modality's prompts (at least one)
    in ``prompts``' order; no prompt text is in both."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"calibration_fraction must be in (0, 1), got {fraction}")
    by_modality: dict[str, list[tuple[str, str]]] = {}
    for pair in prompts:
        by_modality.setdefault(pair[1], []).append(pair)
    chosen = {p for rows in by_modality.values() for p in rows[:max(1, int(round(len(rows) * fraction)))]}
    return [p for p in prompts if p in chosen], [p for p in prompts if p not in chosen]


def _machine() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "python": host.python_version()}


def run_loop(args: argparse.Namespace) -> dict[str, Any]:
    """The four steps of ``--help``; returns the results dict."""
    import torch

    from inference.generation import load_text2image_pipeline
    from medplatform.context import open_platform
    from medplatform.feedback import (
        GeneratedImage,
        GenerationRating,
        list_generation_ratings,
        save_generation_rating,
    )
    from training.rlhf import (
        SEEDS as TRAIN_SEEDS,
    )
    from training.rlhf import (
        RatedImage,
        RewardTrainConfig,
        RLHFConfig,
        SimulatedRater,
        compare_generators,
        generate,
        real_phantoms,
        rlhf_from_ratings,
    )
    from weights.checkpoints import file_sha256
    from weights.generators import resolve_generators_dir

    torch.set_num_threads(args.threads)
    started, cpu0 = time.perf_counter(), time.process_time()
    timings: dict[str, float] = {}
    load = [os.getloadavg()]
    base_dir = resolve_generators_dir(args.generators)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="rlhf-loop-"))
    out_dir = Path(args.generators_out) if args.generators_out else work / "generators"
    pipe = load_text2image_pipeline(base_dir)
    if pipe.selector is None:
        raise FileNotFoundError(f"{base_dir}/selector: the simulated rater needs the selector run")
    version = f"text2image@{file_sha256(base_dir / 'text2image' / 'weights.safetensors')[:12]}"
    train_prompts, eval_prompts = prompt_split(pipe.modalities, pipe.text_encoder.count_tokens,
                                               pipe.text_encoder.max_tokens)
    calibration_prompts, train_prompts = calibration_split(train_prompts, args.calibration_fraction)
    model = pipe.model
    rater = SimulatedRater.from_phantoms(pipe.selector, pipe.image_size, per_modality=args.reference_per_modality,
                                         roundtrip=lambda x: model.decode(model.encode(x)))

    # 0. The rater's scale, fixed on base images of prompts and seeds used nowhere else, before any fine-tuning
    t = time.perf_counter()
    cal_items = [(*calibration_prompts[i % len(calibration_prompts)], SEEDS["calibration"] + i)
                 for i in range(args.n_calibration)]
    cal_ids = rater.modality_ids([m for _, m, _ in cal_items])
    calibration = rater.calibrate(generate(pipe, cal_items, **GENERATION), cal_ids)
    calibration["n_prompts"] = len(calibration_prompts)
    timings["calibrate_s"] = time.perf_counter() - t

    # 1. Base images for rating (one image per request: index 0 of seed s is the noise of seed s)
    t = time.perf_counter()
    items = [(*train_prompts[i % len(train_prompts)], SEEDS["ratings"] + i) for i in range(args.n_ratings)]
    images = generate(pipe, items, **GENERATION)
    scores = rater(images, rater.modality_ids([m for _, m, _ in items]))
    timings["generate_and_rate_s"] = time.perf_counter() - t
    # 2. Stored through the platform API
    t = time.perf_counter()
    env = {"MEDREFINE_DATA_DIR": str(work / "platform")}
    platform = open_platform(env, bentoml_home=work / "bentoml")
    for (prompt, modality, seed), stars in zip(items, scores.rating.tolist(), strict=True):
        image = GeneratedImage(prompt, modality, seed, GENERATION["steps"], GENERATION["guidance_scale"], version)
        save_generation_rating(platform, GenerationRating(image=image, rating=int(stars), dataset=args.dataset))
    stored = list_generation_ratings(platform, args.dataset)
    rated = [RatedImage(r.image.prompt, r.image.modality, r.image.seed, r.image.steps, r.image.guidance_scale,
                        int(r.rating), r.image.index, r.image.negative_prompt, r.image.best_of, r.image.rank_by)
             for r in stored if r.rating is not None and r.image.generator_version == version]
    timings["store_and_list_s"] = time.perf_counter() - t
    load.append(os.getloadavg())
    # 3. Reward model + fine-tuning (regenerates the rated images from their stored identities)
    t = time.perf_counter()
    config = RLHFConfig(samples=args.samples, steps=args.steps, lr=args.lr, temperature=args.temperature,
                        real_weight=args.real_weight, batch_size=args.batch_size)
    report = rlhf_from_ratings(rated, base_dir, out_dir, config=config, pipe=pipe, n_real=args.n_real,
                               reward_config=RewardTrainConfig(steps=args.reward_steps),
                               reward_preset=args.reward_preset, seed=args.seed,
                               ratings_source=f"platform dataset {args.dataset!r} ({work / 'platform'})")
    timings["reward_and_finetune_s"] = time.perf_counter() - t
    load.append(os.getloadavg())
    # 4. Evaluation on new prompts and seeds, through the saved generators directory
    t = time.perf_counter()
    tuned = load_text2image_pipeline(out_dir, text_encoder=pipe.text_encoder)
    eval_items = [(*eval_prompts[i % len(eval_prompts)], args.eval_seed + i) for i in range(args.n_eval)]
    real = real_phantoms(args.n_real_eval, pipe.image_size, TRAIN_SEEDS["reference"] + 5_000, list(pipe.modalities))
    comparison = compare_generators(pipe, tuned, rater, eval_items, real, **GENERATION)
    timings["evaluate_s"] = time.perf_counter() - t
    if args.export:
        from export.generators import export_generator_artifacts

        t = time.perf_counter()
        try:
            manifest = export_generator_artifacts(out_dir, args.export, threads=args.threads)
            exported: dict[str, Any] = {"dir": str(args.export), "graphs": sorted(manifest.get("graphs", {}))}
        except Exception as exc:  # a failed export is a result of the run, not the end of it
            exported = {"dir": str(args.export), "error": f"{type(exc).__name__}: {exc}"}
        timings["export_s"] = time.perf_counter() - t
    load.append(os.getloadavg())
    fid_base, fid_tuned = comparison["fid_base"], comparison["fid_finetuned"]
    result: dict[str, Any] = {
        **({"export": exported} if args.export else {}),
        "rlhf_win_rate": comparison["win_rate_defect"],
        "rlhf_modality_accuracy": comparison["modality_accuracy_finetuned"],
        "fid_base": fid_base,
        "fid_finetuned": fid_tuned,
        "fid_change": (fid_tuned - fid_base) / fid_base if fid_base else None,
        "n_ratings": len(rated),
        "reward_spearman": report["reward"].get("spearman_val"),
        "goals": {"win_rate": 0.60, "modality_accuracy": 0.9, "fid_change_at_most": 0.10},
        "rater_calibration": calibration,
        "rating_histogram_base_rated": {str(k): int((scores.rating == k).sum()) for k in range(1, 6)},
        "evaluation": comparison,
        "reward": report["reward"],
        "finetune": report["finetune"],
        "settings": {**{k: v for k, v in vars(args).items() if k not in ("func",)}, **GENERATION,
                     "base_generator_version": version, "n_train_prompts": len(train_prompts),
                     "n_eval_prompts": len(eval_prompts), "generators_out": str(out_dir)},
        "notes": {
            "rater": "the simulated rater is calibrated on base images of prompts and seeds disjoint from the rated "
                     "and the evaluation ones (rater_calibration: per-term scales, per-modality quintile "
                     "thresholds), then frozen for rating, fine-tuning and evaluation; no hyper-parameter was "
                     "tuned on the evaluation pairs",
            "win_rate": "rlhf_win_rate compares the rater's fine defect score of the two images of each same-prompt "
                        "same-seed pair (a preference judgement; equal scores count half); "
                        "evaluation.win_rate_rating is the same by 1-5 rating (ties, most pairs, count half)",
            "modality_accuracy": "the selector's argmax on the fine-tuned images equals the requested modality",
            "fid": "FID formula on the selector's 64-d features of all evaluation images against "
                   f"{args.n_real_eval} real phantoms (the same modality mix); not Inception",
            "reward_spearman": "held-out 20 % of the ratings, reward model's prediction vs the stored rating",
        },
        "machine": _machine(),
        "load": {"loadavg_1_5_15_at_steps": [[round(v, 2) for v in row] for row in load]},
        "threads": args.threads,
        "seconds": round(time.perf_counter() - started, 1),
        "cpu_seconds": round(time.process_time() - cpu0, 1),
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
    }
    if not args.work and not args.keep_work:
        shutil.rmtree(work / "platform", ignore_errors=True)
    return result


def json_ready(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from training.rlhf import REWARD_PRESETS, RewardTrainConfig, RLHFConfig

    parser.add_argument("--out", default=None, help="results JSON to write (default: print)")
    parser.add_argument("--generators", default="default", help="the base generators directory")
    parser.add_argument("--generators-out", default=str(REPO_ROOT / "runs" / "rlhf" / "generators"),
                        help="the fine-tuned generators directory to write")
    parser.add_argument("--export", default=None, metavar="DIR",
                        help="also export the fine-tuned generators to ONNX artifacts in DIR")
    parser.add_argument("--work", default=None, help="work directory (default: a temporary one)")
    parser.add_argument("--keep-work", action="store_true", help="keep the temporary platform data")
    parser.add_argument("--dataset", default="generation-ratings", help="the platform's ratings dataset")
    parser.add_argument("--n-ratings", type=int, default=300)
    parser.add_argument("--n-calibration", type=int, default=150,
                        help="base images that fix the rater's 1-5 scale (prompts and seeds of their own)")
    parser.add_argument("--calibration-fraction", type=float, default=0.25,
                        help="share of each modality's training prompts reserved for the rater's calibration")
    parser.add_argument("--n-eval", type=int, default=200, help="same-prompt same-seed pairs on new prompts/seeds")
    parser.add_argument("--eval-seed", type=int, default=SEEDS["eval"],
                        help="first noise seed of the evaluation pairs; another range (e.g. 600000) gives validation "
                             "pairs for tuning, disjoint from the reported ones")
    parser.add_argument("--n-real", type=int, default=600, help="real phantoms in the fine-tuning regulariser")
    parser.add_argument("--n-real-eval", type=int, default=200, help="real phantoms for the Frechet distance")
    parser.add_argument("--reference-per-modality", type=int, default=40, help="the rater's real phantoms")
    parser.add_argument("--samples", type=int, default=RLHFConfig.samples)
    parser.add_argument("--steps", type=int, default=RLHFConfig.steps)
    parser.add_argument("--batch-size", type=int, default=RLHFConfig.batch_size)
    parser.add_argument("--lr", type=float, default=RLHFConfig.lr)
    parser.add_argument("--temperature", type=float, default=RLHFConfig.temperature)
    parser.add_argument("--real-weight", type=float, default=RLHFConfig.real_weight)
    parser.add_argument("--reward-steps", type=int, default=RewardTrainConfig.steps)
    parser.add_argument("--reward-preset", default="default", choices=sorted(REWARD_PRESETS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest rlhf", description=_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    result = run_loop(args)
    text = json.dumps(json_ready(result), indent=2, allow_nan=False)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
