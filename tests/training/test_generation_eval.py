"""Generation metrics (SSIM, MS-SSIM, Frechet distance, diversity) and the evaluate-generation report."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from training.evaluate_generation import (
    frechet_distance,
    mean_pairwise_distance,
    ms_ssim,
    ms_ssim_scales,
    nearest_ssim,
    pairwise_diversity,
    ssim,
)


def _smooth(seed: int, n: int = 4, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, size // 4, size // 4, generator=g)
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def test_ssim_is_one_for_identical_images_and_drops_with_noise():
    x = _smooth(0)
    torch.testing.assert_close(ssim(x, x), torch.ones(4))
    noisy = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    noisier = (x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    assert (ssim(x, noisy) < 0.99).all() and (ssim(x, noisier) < ssim(x, noisy)).all()
    with pytest.raises(ValueError, match="shape"):
        ssim(x, x[:, :, :16])


def test_ms_ssim_scales_with_size():
    assert ms_ssim_scales(32) == 2 and ms_ssim_scales(64) == 3 and ms_ssim_scales(256) == 5
    x = _smooth(0, size=64)
    torch.testing.assert_close(ms_ssim(x, x), torch.ones(4))
    y = _smooth(5, size=64)
    assert (ms_ssim(x, y) < 0.9).all()
    assert ms_ssim(_smooth(0, size=16)[:, :, :8, :8], _smooth(0, size=16)[:, :, :8, :8]) is None


def test_nearest_ssim_and_diversity():
    real = _smooth(0, n=5)
    torch.testing.assert_close(nearest_ssim(real[:2], real), torch.ones(2))
    assert pairwise_diversity(real[:1].repeat(3, 1, 1, 1)) == pytest.approx(0.0, abs=1e-6)
    assert pairwise_diversity(real) > 0.1
    feats = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    assert mean_pairwise_distance(feats) == pytest.approx(5.0)


def test_frechet_distance():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 3))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shifted = frechet_distance(a, a + np.array([2.0, 0.0, 0.0]))
    assert shifted == pytest.approx(4.0, rel=1e-6)
    with pytest.raises(ValueError, match="frechet_distance"):
        frechet_distance(a, a[:, :2])


def test_evaluate_generation_report_has_the_top_level_keys(tmp_path):
    from core.phantoms import write_dataset
    from core.text_encoders import load_text_encoder
    from training.evaluate_generation import evaluate_generation
    from training.generators import phantom_pairs, train_pix2pix
    from training.selector import train_selector
    from training.text2image import train_text2image

    root = tmp_path / "generators"
    csv = write_dataset("modality", 10, tmp_path / "data", seed=0, size=32) / "captions.csv"
    encoder = load_text_encoder("minilm", max_tokens=16)
    train_selector(csv, csv, root / "selector", preset="tiny", epochs=1, steps_per_epoch=2, batch_size=5)
    train_text2image(csv, csv, root / "text2image", preset="tiny", epochs=1, steps_per_epoch=1, encoder=encoder)
    pairs = phantom_pairs(2, 0, 32)
    train_pix2pix(pairs, pairs, root / "pix2pix", preset="tiny", disc="tiny", epochs=1, steps_per_epoch=1,
                  batch_size=2)
    report = evaluate_generation(root, csv, per_modality=2, best_of=2, steps=2, transunet=None, judge_steps=1,
                                 judge_pairs=4, n_masks=4, text_encoder=encoder)
    assert 0.0 <= report["modality_accuracy"] <= 1.0
    assert 0.0 <= report["pix2pix_consistency_dice"] <= 1.0
    assert set(report["per_modality"]) == {"oct", "fundus", "chest_xray", "chest_ct", "brain_mri"}
    row = report["per_modality"]["oct"]
    for key in ("selector_accuracy", "ssim_to_nearest_real", "diversity_1_minus_ssim", "frechet_selector_features",
                "selector_accuracy_best_of_2"):
        assert key in row and (row[key] is None or math.isfinite(row[key]) or math.isnan(row[key]))
    assert "trained here" in report["pix2pix_consistency"]["transunet"]  # no TransUNet run dir was given
    assert "autoencoder" not in report  # a pixel-space generator has none to report
    json.dumps(report)  # JSON-ready


def test_a_latent_generator_reports_its_autoencoder_on_the_held_out_images(tmp_path):
    from core.phantoms import write_dataset
    from core.text_encoders import load_text_encoder
    from training.evaluate_generation import evaluate_generation
    from training.selector import train_selector
    from training.text2image import AutoencoderTrainConfig, Text2ImageTrainConfig, train_text2image

    root = tmp_path / "generators"
    csv = write_dataset("modality", 10, tmp_path / "data", seed=0, size=32) / "captions.csv"
    test_csv = write_dataset("modality", 10, tmp_path / "test", seed=2000, size=32) / "captions.csv"
    encoder = load_text_encoder("minilm", max_tokens=16)
    train_selector(csv, csv, root / "selector", preset="tiny", epochs=1, steps_per_epoch=2, batch_size=5)
    train_text2image(csv, csv, root / "text2image", preset="tiny_latent", epochs=1, steps_per_epoch=1,
                     encoder=encoder, config=Text2ImageTrainConfig(batch_size=4),
                     autoencoder=AutoencoderTrainConfig(steps=2, batch_size=4))
    report = evaluate_generation(root, test_csv, per_modality=2, best_of=1, steps=2, text_encoder=encoder)
    auto = report["autoencoder"]
    assert auto["n"] == 10 and math.isfinite(auto["psnr"]) and -1.0 <= auto["ssim"] <= 1.0
    assert report["settings"]["image_size"] == 32 and "16 px" in report["settings"]["selector_input"]


def test_committed_generators_make_recognisable_modalities():
    """The committed checkpoints/generators: one image per modality, named correctly by the committed selector."""
    from inference.generation import load_pix2pix_pipeline, load_text2image_pipeline
    from training.generators import phantom_pairs
    from weights.generators import GENERATORS_DIR

    pipe = load_text2image_pipeline(GENERATORS_DIR)
    prompts = {"oct": "retinal oct, drusen", "fundus": "fundus photograph, diabetic retinopathy",
               "chest_xray": "chest x-ray, cardiomegaly", "chest_ct": "chest ct, right lung nodule",
               "brain_mri": "brain mri, glioma"}
    images = pipe.sample(list(prompts.values()), list(prompts), steps=25, seed=0)
    assert images.shape == (5, 1, 128, 128)  # latent diffusion, decoded
    with torch.no_grad():
        predicted = pipe.selector(images).modality_logits.argmax(1).tolist()
    assert sum(p == i for i, p in enumerate(predicted)) >= 4, predicted
    masks = phantom_pairs(2, 123, 128).masks
    out = load_pix2pix_pipeline(GENERATORS_DIR).generate(masks)
    assert out.shape == (2, 128, 128)
    # The lesion (mask) is rendered darker than its surroundings, as in B-mode ultrasound.
    assert all(o[m > 0].mean() < o[m == 0].mean() for o, m in zip(out, masks, strict=True))


def test_committed_generators_stay_within_their_size_budget():
    """README, "MINIM-style text + modality -> image": the committed weights stay under 7 MiB."""
    from weights.generators import GENERATORS_DIR

    weights = sum(p.stat().st_size for p in GENERATORS_DIR.glob("*/weights.safetensors"))
    assert weights < 7 * 2**20, f"{weights / 2**20:.2f} MiB"
