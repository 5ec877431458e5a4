"""pix2pix generator, PatchGAN discriminator and stage-1 training (tiny configs)."""

from __future__ import annotations

import json

import pytest
import torch

from models.patchgan import PatchGANConfig, build_patchgan, receptive_field
from models.pix2pix import PIX2PIX_PRESETS, Pix2PixConfig, build_pix2pix
from training.generators import (
    PairSet,
    Pix2PixHooks,
    Pix2PixTrainConfig,
    phantom_pairs,
    scanner_shift,
    train_pix2pix,
)


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_generator_maps_masks_to_unit_range_images():
    torch.manual_seed(0)
    g = build_pix2pix("tiny").eval()
    masks = (torch.rand(3, 1, 32, 32) > 0.5).float()
    with torch.no_grad():
        out = g(masks)
    assert out.shape == (3, 1, 32, 32)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert not torch.allclose(out[0], out[1])  # different masks, different images


def test_generator_rejects_bad_shapes_and_configs():
    g = build_pix2pix("tiny")
    with pytest.raises(ValueError, match="divisible by 32"):
        g(torch.zeros(1, 1, 48, 48))
    with pytest.raises(ValueError, match=r"\(B, 1, S, S\)"):
        g(torch.zeros(1, 2, 32, 32))
    with pytest.raises(ValueError, match="image_size"):
        Pix2PixConfig(image_size=100, num_downs=5)
    with pytest.raises(ValueError, match="norm"):
        Pix2PixConfig(norm="layer")
    with pytest.raises(ValueError, match="unknown pix2pix preset"):
        build_pix2pix("unet_512")
    with pytest.raises(ValueError, match="unknown field"):
        Pix2PixConfig.from_dict({"ngf": 8, "bogus": 1})


def test_config_round_trip_and_presets():
    for config in PIX2PIX_PRESETS.values():
        assert Pix2PixConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert PIX2PIX_PRESETS["unet_256"].ngf == 64 and PIX2PIX_PRESETS["unet_256"].num_downs == 8


def test_paper_sizes_match_the_official_parameter_counts():
    # The official pix2pix prints 54.414 M (unet_256 G) and 2.769 M (basic D) for RGB facades.
    with torch.device("meta"):
        g = build_pix2pix(Pix2PixConfig(image_size=256, input_nc=3, output_nc=3, ngf=64, num_downs=8, max_mult=8,
                                        norm="batch"))
        d = build_patchgan(PatchGANConfig(input_nc=6, ndf=64, n_layers=3, norm="batch"))
    assert _count(g) == 54_413_955
    assert _count(d) == 2_768_705
    assert receptive_field(3) == 70


def test_patchgan_outputs_patch_logits():
    d = build_patchgan("tiny")
    x = torch.rand(2, 1, 32, 32)
    out = d(x, x)
    assert out.shape[:2] == (2, 1) and out.shape[-1] > 1
    with pytest.raises(ValueError, match="input_nc"):
        d(torch.rand(2, 2, 32, 32), x)


def test_hooks_step_the_discriminator_and_leave_its_grads_to_itself():
    torch.manual_seed(0)
    g, d = build_pix2pix("tiny"), build_patchgan("tiny")
    hooks = Pix2PixHooks(d, Pix2PixTrainConfig())
    before = [p.detach().clone() for p in d.parameters()]
    pairs = phantom_pairs(2, 0, 32)
    out = hooks.training_step(g, pairs.tensors())
    assert any(not torch.equal(a, b) for a, b in zip(before, d.parameters(), strict=True))  # D stepped
    d_grads = [None if p.grad is None else p.grad.clone() for p in d.parameters()]
    out.loss.backward()
    assert all(p.grad is not None for p in g.parameters())
    # The generator loss must not add to D's gradients (D is frozen while it is built).
    assert all((a is None and b.grad is None) or (a is not None and torch.equal(a, b.grad))
               for a, b in zip(d_grads, d.parameters(), strict=True))
    assert set(out.scalars) == {"loss_d", "loss_g_gan", "loss_g_l1"}


def test_ood_phantoms_differ_from_in_domain():
    in_domain, ood = phantom_pairs(3, 5, 32, "in"), phantom_pairs(3, 5, 32, "ood")
    assert in_domain.images.shape == ood.images.shape == (3, 32, 32)
    assert (ood.images >= 0).all() and (ood.images <= 1).all()
    assert (ood.masks == in_domain.masks).mean() < 1.0 or not (ood.images == in_domain.images).all()
    assert float(abs(ood.images - in_domain.images).mean()) > 0.02
    assert (scanner_shift(in_domain.images[0], 1) == scanner_shift(in_domain.images[0], 1)).all()
    with pytest.raises(ValueError, match="domain"):
        phantom_pairs(1, 0, 32, "other")


def test_train_pix2pix_writes_a_loadable_run_dir(tmp_path):
    from inference.generation import Pix2PixPipeline
    from weights.checkpoints import load_run
    from weights.generators import load_pix2pix

    pairs = phantom_pairs(4, 0, 32)
    generator, metrics = train_pix2pix(pairs, PairSet(pairs.images[:2], pairs.masks[:2], pairs.names[:2], "v"),
                                       tmp_path / "p2p", preset="tiny", disc="tiny", epochs=2, steps_per_epoch=2,
                                       batch_size=2)
    for name in ("run.json", "weights.safetensors", "log.csv", "curves.png"):
        assert (tmp_path / "p2p" / name).is_file()
    info = load_run(tmp_path / "p2p")
    assert info.kind == "pix2pix" and info.config["pix2pix"]["ngf"] == 4
    assert {"val_l1", "val_psnr", "val_ssim"} <= set(metrics)
    loaded = load_pix2pix(tmp_path / "p2p")
    masks = pairs.tensors()[1][:2]
    with torch.no_grad():
        torch.testing.assert_close(loaded(masks), generator(masks))
    images = Pix2PixPipeline(loaded).generate(pairs.masks[:2] * 255)
    assert images.shape == (2, 32, 32) and images.dtype.name == "uint8"


def test_half_precision_weights_load_into_float32_modules():
    from training.generators import half_precision

    torch.manual_seed(0)
    g = build_pix2pix("tiny").eval()
    state = half_precision(g)
    assert all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())
    loaded = build_pix2pix("tiny").eval()
    loaded.load_state_dict(state)
    masks = (torch.rand(2, 1, 32, 32) > 0.5).float()
    with torch.no_grad():
        assert next(loaded.parameters()).dtype == torch.float32
        torch.testing.assert_close(loaded(masks), g(masks), atol=5e-3, rtol=0)
