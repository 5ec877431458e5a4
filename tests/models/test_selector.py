"""Selector: modality classifier + realness score, its corruptions and a tiny training run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.selector import SelectorConfig, build_selector
from training.selector import CORRUPTIONS, corrupt, train_selector


def test_forward_resizes_and_scores():
    torch.manual_seed(0)
    selector = build_selector("tiny").eval()
    images = torch.rand(3, 1, 40, 40)
    with torch.no_grad():
        out = selector(images)
        score = selector.score(images, torch.tensor([0, 1, 4]))
    assert out.modality_logits.shape == (3, 5) and out.real_logit.shape == (3,)
    assert out.features.shape == (3, selector.feature_dim)
    expected = F.log_softmax(out.modality_logits, 1)[torch.arange(3), torch.tensor([0, 1, 4])] + F.logsigmoid(
        out.real_logit)
    torch.testing.assert_close(score, expected)
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        selector(torch.rand(3, 3, 16, 16))


def test_config_validation():
    with pytest.raises(ValueError, match="channels"):
        SelectorConfig(channels=(6, 8))
    with pytest.raises(ValueError, match="image_size"):
        SelectorConfig(image_size=4, channels=(4, 8, 8))
    with pytest.raises(ValueError, match="unknown field"):
        SelectorConfig.from_dict({"depth": 3})


def test_corruptions_stay_in_range_and_change_the_images():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2 * len(CORRUPTIONS), 1, 32, 32)
    ids = torch.arange(len(images)) % 5
    out = corrupt(images, ids, g)
    assert out.shape == images.shape
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert ((out - images).abs().flatten(1).mean(1) > 1e-3).all()


def test_train_selector_learns_phantom_modalities(tmp_path):
    from core.phantoms import write_dataset
    from weights.checkpoints import load_run
    from weights.generators import load_selector

    csv = write_dataset("modality", 20, tmp_path / "data", seed=0, size=32) / "captions.csv"
    selector, metrics = train_selector(csv, csv, tmp_path / "sel", preset="tiny", epochs=2, steps_per_epoch=15,
                                       batch_size=10, lr=5e-3)
    assert metrics["val_accuracy"] >= 0.6  # five classes: chance is 0.2
    info = load_run(tmp_path / "sel")
    assert info.kind == "selector" and info.config["selector"]["image_size"] == 16
    loaded = load_selector(tmp_path / "sel")
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).modality_logits, selector(x).modality_logits)
