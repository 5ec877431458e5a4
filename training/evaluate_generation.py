"""Image-similarity metrics for generators and ``python -m training evaluate-generation`` (the metrics and
the judge: docs/architecture.md, "training").
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float32) - (size - 1) / 2.0
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]  # (1, 1, k, k)


def _window_for(size: int) -> tuple[int, float]:
    return (11, 1.5) if size >= 32 else (7, 1.0)


def _ssim_terms(x: torch.Tensor, y: torch.Tensor, window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    c1, c2 = 0.01**2, 0.03**2
    mu_x, mu_y = F.conv2d(x, window), F.conv2d(y, window)
    sxx = F.conv2d(x * x, window) - mu_x**2
    syy = F.conv2d(y * y, window) - mu_y**2
    sxy = F.conv2d(x * y, window) - mu_x * mu_y
    cs = (2 * sxy + c2) / (sxx + syy + c2)
    luminance = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
    return (luminance * cs).flatten(1).mean(1), cs.flatten(1).mean(1)


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"expected two (B, 1, H, W) tensors of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """SSIM per image pair: ``(B,)`` in [-1, 1] for ``(B, 1, H, W)`` images in [0, 1] (H, W >= 7)."""
    _check_pair(x, y)
    k, sigma = _window_for(min(x.shape[-2:]))
    if min(x.shape[-2:]) < k:
        raise ValueError(f"ssim: images of {tuple(x.shape[-2:])} px are smaller than the {k} px window")
    window = _gaussian_window(k, sigma).to(x)
    return _ssim_terms(x.float(), y.float(), window)[0]


def ms_ssim_scales(size: int) -> int:
    """How many MS-SSIM scales (at most 5) an image of ``size`` px allows with the window :func:`ssim` uses."""
    k, _ = _window_for(size)
    scales = 0
    while scales < len(MS_SSIM_WEIGHTS) and size // (2**scales) >= k:
        scales += 1
    return scales


def ms_ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
    """Multi-scale SSIM per pair ``(B,)``, or ``None`` when the size allows fewer than two scales."""
    _check_pair(x, y)
    size = min(x.shape[-2:])
    scales = ms_ssim_scales(size)
    if scales < 2:
        return None
    k, sigma = _window_for(size)
    window = _gaussian_window(k, sigma).to(x)
    weights = torch.tensor(MS_SSIM_WEIGHTS[:scales])
    weights = weights / weights.sum()
    x, y = x.float(), y.float()
    values = []
    for s in range(scales):
        full, cs = _ssim_terms(x, y, window)
        values.append(full if s == scales - 1 else cs)
        if s < scales - 1:
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    stacked = torch.stack(values, dim=1).clamp_min(1e-6)  # (B, scales); negative cs would make the power NaN
    return torch.prod(stacked ** weights[None, :], dim=1)


def nearest_ssim(generated: torch.Tensor, real: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """For every generated image, the SSIM to its most similar real image: ``(G,)``."""
    best = torch.full((generated.shape[0],), -1.0)
    for i in range(generated.shape[0]):
        g = generated[i : i + 1]
        for start in range(0, real.shape[0], chunk):
            r = real[start : start + chunk]
            best[i] = max(best[i], float(ssim(g.expand_as(r), r).max()))
    return best


def pairwise_diversity(images: torch.Tensor) -> float:
    """Mean ``1 - SSIM`` over all unordered pairs of ``(N, 1, H, W)`` images (0 = all identical)."""
    n = images.shape[0]
    if n < 2:
        raise ValueError("pairwise_diversity needs at least two images")
    i, j = torch.triu_indices(n, n, offset=1)
    return float((1.0 - ssim(images[i], images[j])).mean())


def mean_pairwise_distance(features: torch.Tensor) -> float:
    """Mean Euclidean distance over all unordered pairs of ``(N, D)`` feature vectors."""
    n = features.shape[0]
    if n < 2:
        raise ValueError("mean_pairwise_distance needs at least two vectors")
    i, j = torch.triu_indices(n, n, offset=1)
    return float((features[i] - features[j]).norm(dim=1).mean())


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` for ``(N, D)`` feature sets (FID's formula)."""
    from scipy import linalg

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"frechet_distance: expected (N, D) arrays with N >= 2, got {a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():  # few samples give singular covariances; the eps retry below handles it
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(covmean).all():
        eps = np.eye(a.shape[1]) * 1e-6
        covmean = linalg.sqrtm((cov_a + eps) @ (cov_b + eps))
    covmean = np.real(covmean)
    value = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(covmean))
    return max(value, 0.0) if math.isfinite(value) else float("nan")


# ----------------------------------------------------------------------------------------------------------
# The evaluation
# ----------------------------------------------------------------------------------------------------------


def _real_by_modality(csv_path: str | Path, size: int) -> dict[str, tuple[torch.Tensor, list[str]]]:
    from core.datasets import CaptionDataset

    groups: dict[str, tuple[list[np.ndarray], list[str]]] = {}
    for sample in CaptionDataset(csv_path, size=size):
        images, captions = groups.setdefault(sample.modal, ([], []))
        images.append(sample.image)
        captions.append(sample.text)
    return {m: (torch.from_numpy(np.stack(imgs).astype(np.float32))[:, None], caps)
            for m, (imgs, caps) in groups.items()}


def _judge_transunet(transunet: str | None, size: int, seed: int, judge_steps: int,
                     work: Path, judge_pairs: int = 200) -> tuple[torch.nn.Module, str]:
    """The TransUNet that segments pix2pix images: a run dir (UltraRefiner or TransUNet), else a judge trained
    here on ultrasound phantoms."""
    from models.ultrarefiner import UltraRefiner
    from weights.checkpoints import RUN_JSON, build_model_from_run, resolve_run_dir

    if transunet is not None and (resolve_run_dir(transunet) / RUN_JSON).is_file():
        model = build_model_from_run(transunet)
        if isinstance(model, UltraRefiner):  # the judge is its TransUNet stage
            model = model.transunet
        return model.eval(), f"run dir {resolve_run_dir(transunet)}"
    from training.generators import phantom_pairs
    from training.genseg import GenSegConfig, train_baseline, transunet_config

    pairs = phantom_pairs(judge_pairs, seed + 7000, size)
    with torch.enable_grad():  # callers may be under no_grad
        model, metrics = train_baseline(pairs, work / "judge_transunet", config=GenSegConfig(hflip=True),
                                        steps=judge_steps, batch_size=8, seed=seed,
                                        transunet=transunet_config(size))
    return model.eval(), (
        f"TransUNet 'default' preset trained here for {judge_steps} steps on {judge_pairs} ultrasound "
        f"phantoms (no committed checkpoints/default found); train val_dice "
        f"{metrics.get('val_dice', float('nan')):.3f}"
    )


@torch.no_grad()
def pix2pix_consistency(generators_dir: str | Path, *, transunet: str | None = "default", n_masks: int = 48,
                        seed: int = 0, judge_steps: int = 300, judge_pairs: int = 200,
                        work: str | Path | None = None) -> dict[str, Any]:
    """Dice of the TransUNet's mask on pix2pix images vs the conditioning masks (held-out phantom masks),
    next to the same TransUNet's Dice on the real images of those masks (the ceiling)."""
    from core.metrics import dice
    from training.generators import phantom_pairs
    from weights.generators import load_pix2pix, resolve_generators_dir

    root = resolve_generators_dir(generators_dir)
    generator = load_pix2pix(root / "pix2pix")
    size = generator.config.image_size
    work = Path(work) if work else root.parent / f".{root.name}-data" / "judge"  # never inside the committed dir
    judge, source = _judge_transunet(transunet, size, seed, judge_steps, work, judge_pairs)
    if judge.config.img_size != size:
        raise ValueError(
            f"TransUNet ({source}) takes {judge.config.img_size} px; the pix2pix generator makes {size} px"
        )
    pairs = phantom_pairs(n_masks, seed + 9000, size)
    images, masks = pairs.tensors()
    fake = generator(masks)
    pred_fake = (torch.sigmoid(judge(fake)) > 0.5).numpy()[:, 0]
    pred_real = (torch.sigmoid(judge(images)) > 0.5).numpy()[:, 0]
    gt = masks.numpy()[:, 0] > 0.5
    d_fake = [dice(p, g) for p, g in zip(pred_fake, gt, strict=True)]
    d_real = [dice(p, g) for p, g in zip(pred_real, gt, strict=True)]
    return {
        "dice": float(np.mean(d_fake)),
        "dice_std": float(np.std(d_fake)),
        "real_image_dice": float(np.mean(d_real)),
        "n_masks": n_masks,
        "masks": pairs.source,
        "transunet": source,
        "image_l1_to_real": float((fake - images).abs().mean()),
        "image_ssim_to_real": float(ssim(fake, images).mean()),
    }


@torch.no_grad()
def evaluate_generation(
    generators_dir: str | Path,
    csv_test: str | Path,
    *,
    per_modality: int = 20,
    best_of: int = 4,
    guidance_scale: float = 1.5,
    steps: int = 25,
    seed: int = 0,
    transunet: str | None = "default",
    judge_steps: int = 300,
    judge_pairs: int = 200,
    n_masks: int = 48,
    text_encoder: object = None,
    work: str | Path | None = None,
) -> dict[str, Any]:
    """The full report: per modality the selector's accuracy on generated images (single sample and best of
    ``best_of``), SSIM / MS-SSIM to the nearest real image, diversity, selector-feature Frechet distance, and
    the pix2pix consistency Dice. Top-level ``modality_accuracy`` and ``pix2pix_consistency_dice``."""
    from inference.generation import load_text2image_pipeline
    from models.text2image import Text2ImageModel
    from weights.generators import resolve_generators_dir

    root = resolve_generators_dir(generators_dir)
    pipe = load_text2image_pipeline(root, text_encoder=text_encoder)
    selector = pipe.selector
    if selector is None:
        raise FileNotFoundError(f"{root / 'selector'}: the evaluation needs the selector run dir")
    size = pipe.image_size
    real = _real_by_modality(csv_test, size)
    per: dict[str, Any] = {}
    for m_index, modality in enumerate(pipe.modalities):
        if modality not in real:
            continue
        real_images, captions = real[modality]
        prompts = [captions[i % len(captions)] for i in range(per_modality)]
        gen = pipe.sample(prompts, [modality] * per_modality, guidance_scale=guidance_scale, steps=steps,
                          seed=seed + 100_000 * m_index)
        out_gen, out_real = selector(gen), selector(real_images)
        accuracy = float((out_gen.modality_logits.argmax(1) == m_index).float().mean())
        real_accuracy = float((out_real.modality_logits.argmax(1) == m_index).float().mean())
        row: dict[str, Any] = {
            "n_generated": per_modality, "n_real": len(real_images),
            "selector_accuracy": accuracy,
            "selector_accuracy_on_real": real_accuracy,
            "p_real_generated": float(torch.sigmoid(out_gen.real_logit).mean()),
            "p_real_real": float(torch.sigmoid(out_real.real_logit).mean()),
            "ssim_to_nearest_real": float(nearest_ssim(gen, real_images).mean()),
            "diversity_1_minus_ssim": pairwise_diversity(gen),
            "diversity_1_minus_ssim_real": pairwise_diversity(real_images),
            "feature_distance_generated": mean_pairwise_distance(out_gen.features),
            "feature_distance_real": mean_pairwise_distance(out_real.features),
            "frechet_selector_features": frechet_distance(out_gen.features.numpy(), out_real.features.numpy()),
        }
        # MS-SSIM between each generated image and its nearest real image (by SSIM).
        nearest = torch.tensor([int(torch.argmax(ssim(g[None].expand_as(real_images), real_images)))
                                for g in gen]) if ms_ssim_scales(size) >= 2 else None
        if nearest is not None:
            row["ms_ssim_to_nearest_real"] = float(ms_ssim(gen, real_images[nearest]).mean())
            row["ms_ssim_scales"] = ms_ssim_scales(size)
        if best_of > 1:
            n_best = max(2, per_modality // 2)
            best, _ = pipe.generate_best_of(prompts[:n_best], [modality] * n_best, candidates=best_of,
                                            guidance_scale=guidance_scale, steps=steps, seed=seed + 500_000 + m_index)
            best_t = torch.from_numpy(best.astype(np.float32) / 255.0)[:, None]
            row[f"selector_accuracy_best_of_{best_of}"] = float(
                (selector(best_t).modality_logits.argmax(1) == m_index).float().mean())
        per[modality] = row
    accuracy = float(np.mean([r["selector_accuracy"] for r in per.values()]))
    report: dict[str, Any] = {
        "modality_accuracy": accuracy,
        "pix2pix_consistency_dice": None,
        "per_modality": per,
        "settings": {"generators_dir": str(root), "test_csv": str(csv_test), "per_modality": per_modality,
                     "guidance_scale": guidance_scale, "steps": steps, "seed": seed, "best_of": best_of,
                     "image_size": size, "selector_input": f"generated and real {size} px images alike, resized "
                                                            f"to the selector's {selector.config.image_size} px "
                                                            "(models.selector.fit_size)"},
        "notes": {"frechet": "FID formula on the selector's own penultimate features (64-d), not Inception; "
                             "comparable only between runs scored with the same selector checkpoint",
                  "ssim": "Gaussian 11x11 window; nearest = the most similar real test image of the same modality",
                  "ms_ssim": "standard weights renormalised to the scales the image size allows"},
    }
    if isinstance(pipe.model, Text2ImageModel) and pipe.model.autoencoder is not None:
        # latent diffusion: how well the autoencoder reproduces the held-out phantoms
        from training.text2image import reconstruction_quality

        test_images = torch.cat([images for images, _ in real.values()])
        report["autoencoder"] = {**reconstruction_quality(pipe.model.autoencoder, test_images),
                                 "images": f"the {len(test_images)} real test phantoms at {size} px (held out)"}
    if best_of > 1:
        report[f"modality_accuracy_best_of_{best_of}"] = float(
            np.mean([r[f"selector_accuracy_best_of_{best_of}"] for r in per.values()]))
    if (root / "pix2pix" / "run.json").is_file():
        consistency = pix2pix_consistency(root, transunet=transunet, seed=seed, judge_steps=judge_steps,
                                          judge_pairs=judge_pairs, n_masks=n_masks, work=work)
        report["pix2pix_consistency_dice"] = consistency["dice"]
        report["pix2pix_consistency"] = consistency
    return report


def add_arguments(parser: Any, command_name: str = "evaluate-generation") -> None:
    parser.add_argument("--model", default="default", help="generators folder ('default' = checkpoints/generators)")
    parser.add_argument("--json", help="write the report here")
    parser.add_argument("--csv", help="real test CSV path,text,modal (default: 100 phantoms, seed 2000)")
    parser.add_argument("--per-modality", type=int, default=20)
    parser.add_argument("--best-of", type=int, default=4)
    parser.add_argument("--guidance-scale", type=float, default=1.5)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--transunet", default="default",
                        help="run dir whose TransUNet segments pix2pix images ('default' = checkpoints/default); "
                             "when absent a judge TransUNet is trained on phantoms")
    parser.add_argument("--judge-steps", type=int, default=300)
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 helps on a busy machine)")


def run(args: Any) -> int:
    import json
    import logging
    import tempfile

    from training.text2image import write_modality_dataset
    from weights.generators import resolve_generators_dir

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    root = resolve_generators_dir(args.model)
    with tempfile.TemporaryDirectory(prefix="evaluate-generation-") as work:
        csv_test = args.csv or write_modality_dataset(Path(work) / "test", 100, args.seed + 2000)
        report = evaluate_generation(root, csv_test, per_modality=args.per_modality, best_of=args.best_of,
                                     guidance_scale=args.guidance_scale, steps=args.steps, seed=args.seed,
                                     transunet=args.transunet, judge_steps=args.judge_steps,
                                     work=Path(work) / "judge")
    text = json.dumps(report, indent=2)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    print(text)
    return 0
