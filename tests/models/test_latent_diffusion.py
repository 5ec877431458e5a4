"""Latent diffusion: the autoencoder (training, reconstruction, latent scale), the UNet on its latents, the
pipeline decoding them, a tiny training run, and old pixel-space configs still loading as pixel models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from core.text_encoders import load_text_encoder
from inference.generation import Text2ImagePipeline
from models.autoencoder import AutoencoderConfig
from models.text2image import TEXT2IMAGE_PRESETS, Text2ImageConfig, build_text2image

pytestmark = pytest.mark.usefixtures("single_thread_torch")


@pytest.fixture(scope="module")
def encoder():
    return load_text_encoder("minilm", max_tokens=16)


def _phantoms(tmp_path, n: int, seed: int, size: int = 32) -> torch.Tensor:
    from core.datasets import CaptionDataset
    from core.phantoms import write_dataset

    csv = write_dataset("modality", n, tmp_path / f"data-{seed}", seed=seed, size=size) / "captions.csv"
    return torch.from_numpy(np.stack([s.image for s in CaptionDataset(csv, size=size)]).astype(np.float32))[:, None]


def test_default_preset_is_128_px_latent_diffusion_on_16x16x4():
    config = TEXT2IMAGE_PRESETS["default"]
    assert config.image_size == 128 and config.latent is not None
    assert config.sample_shape == (4, 16, 16)
    assert TEXT2IMAGE_PRESETS["pixel32"].latent is None and TEXT2IMAGE_PRESETS["pixel32"].sample_shape == (1, 32, 32)


def test_config_round_trips_and_names_bad_latent_fields():
    config = TEXT2IMAGE_PRESETS["tiny_latent"]
    assert Text2ImageConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="norm_num_groups"):
        AutoencoderConfig(block_out_channels=(6, 8), norm_num_groups=4)
    with pytest.raises(ValueError, match="image_size"):  # 34 px is not divisible by downsampling 2 x UNet 2
        Text2ImageConfig.from_dict({**config.to_dict(), "image_size": 34})


def test_an_old_pixel_config_without_the_latent_key_builds_the_pixel_model():
    old = TEXT2IMAGE_PRESETS["tiny"].to_dict()
    old.pop("latent")  # run.json files written before latent diffusion have no such key
    model = build_text2image(old)
    assert model.autoencoder is None and model.config.sample_shape == (1, 16, 16)
    assert not any(k.startswith("autoencoder.") for k in model.state_dict())
    images = torch.rand(2, 1, 16, 16)
    torch.testing.assert_close(model.encode(images), images * 2 - 1)
    torch.testing.assert_close(model.decode(model.encode(images)), images)


def test_latent_model_denoises_latents_and_decodes_images():
    torch.manual_seed(0)
    model = build_text2image("tiny_latent").eval()
    assert model.sample_shape == (2, 16, 16)
    images = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        latents = model.encode(images)
        eps = model(latents, torch.tensor([10, 500, 900]), torch.randn(3, 5, 384), torch.ones(3, 5),
                    torch.tensor([0, 1, 5]))
        decoded = model.decode(latents)
    assert latents.shape == eps.shape == (3, 2, 16, 16)
    assert decoded.shape == (3, 1, 32, 32) and 0.0 <= float(decoded.min()) and float(decoded.max()) <= 1.0


def test_autoencoder_training_improves_held_out_reconstruction_and_scales_latents(tmp_path):
    from training.text2image import AutoencoderTrainConfig, reconstruction_quality, train_autoencoder

    train, held_out = _phantoms(tmp_path, 40, 0), _phantoms(tmp_path, 20, 1000)
    torch.manual_seed(0)
    model = build_text2image("tiny_latent")
    before = reconstruction_quality(model.autoencoder, held_out)
    metrics = train_autoencoder(model.autoencoder, train, held_out,
                                AutoencoderTrainConfig(steps=60, batch_size=8, lr=5e-3))
    after = reconstruction_quality(model.autoencoder, held_out)
    assert after["psnr"] > before["psnr"] + 3.0 and after["ssim"] > before["ssim"] + 0.2
    assert metrics["val_psnr"] == pytest.approx(after["psnr"])
    # the latent scale makes the cached training latents unit-variance, as the noise schedule assumes
    assert float(model.encode(train).std()) == pytest.approx(1.0, abs=1e-3)
    assert not any(p.requires_grad for p in model.autoencoder.parameters())  # frozen for the UNet's training


def test_latent_pipeline_returns_decoded_images_per_seed(encoder):
    torch.manual_seed(0)
    pipe = Text2ImagePipeline(build_text2image("tiny_latent"), encoder)
    kwargs = dict(prompts=["chest ct, emphysema", "brain mri"], modalities=["chest_ct", "brain_mri"], steps=3,
                  guidance_scale=2.0)
    a, b, c = pipe.generate(**kwargs, seed=7), pipe.generate(**kwargs, seed=7), pipe.generate(**kwargs, seed=8)
    assert a.shape == (2, 32, 32) and a.dtype == np.uint8 and pipe.image_size == 32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    single = pipe.sample(["brain mri"], ["brain_mri"], steps=3, guidance_scale=2.0, seed=8)
    torch.testing.assert_close(pipe.sample(**kwargs, seed=7)[1:], single, atol=1e-4, rtol=0)  # seed + 1


def test_train_latent_text2image_writes_a_run_dir_that_loads_into_the_same_pipeline(tmp_path, encoder):
    from core.phantoms import write_dataset
    from inference.generation import load_text2image_pipeline
    from training.text2image import AutoencoderTrainConfig, Text2ImageTrainConfig, train_text2image
    from weights.checkpoints import load_run

    csv = write_dataset("modality", 10, tmp_path / "data", seed=0, size=32) / "captions.csv"
    model, metrics = train_text2image(csv, csv, tmp_path / "gen" / "text2image", preset="tiny_latent", epochs=2,
                                      steps_per_epoch=2, encoder=encoder, config=Text2ImageTrainConfig(batch_size=4),
                                      autoencoder=AutoencoderTrainConfig(steps=3, batch_size=4))
    assert math.isfinite(metrics["val_loss"])
    info = load_run(tmp_path / "gen" / "text2image")
    assert info.config["text2image"]["latent"]["latent_channels"] == 2
    assert info.metrics["autoencoder"]["steps"] == 3 and math.isfinite(info.metrics["autoencoder"]["val_psnr"])
    pipeline = load_text2image_pipeline(tmp_path / "gen", text_encoder=encoder)
    images = pipeline.generate(["chest ct, emphysema"], ["chest_ct"], steps=2, seed=0)
    expected = Text2ImagePipeline(model, encoder).generate(["chest ct, emphysema"], ["chest_ct"], steps=2, seed=0)
    assert images.shape == (1, 32, 32)
    np.testing.assert_array_equal(images, expected)
    with pytest.raises(ValueError, match="hflip"):
        train_text2image(csv, csv, tmp_path / "flip", preset="tiny_latent", encoder=encoder,
                         config=Text2ImageTrainConfig(hflip=True))


def test_the_training_loss_on_images_equals_the_loss_on_their_cached_latents(tmp_path, encoder):
    from training.text2image import DiffusionHooks, Text2ImageTrainConfig

    torch.manual_seed(0)
    model = build_text2image("tiny_latent")
    hooks = DiffusionHooks(model, encoder, ["brain mri"], Text2ImageTrainConfig())
    images, ids = _phantoms(tmp_path, 4, 3), torch.tensor([0, 1, 2, 3])
    prompts = ["brain mri"] * 4
    on_images = hooks._loss(model, images, prompts, ids, torch.Generator().manual_seed(1), None)
    on_latents = hooks._loss_samples(model, model.encode(images).detach(), prompts, ids,
                                     torch.Generator().manual_seed(1), None)
    torch.testing.assert_close(on_images, on_latents)
    on_images.backward()
    assert all(p.grad is None for p in model.autoencoder.parameters())
    assert any(p.grad is not None for p in model.unet.parameters())
