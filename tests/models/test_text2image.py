"""Text + modality diffusion: model, offline MiniLM, pipeline (DDIM, CFG, negatives, seeds, validation),
prompt augmentation and a tiny training run. diffusers-test-sized components (block_out_channels (4, 8))."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from core.text_encoders import TextEncoderError, load_text_encoder
from inference.generation import GenerationInputError, Text2ImagePipeline
from models.text2image import Text2ImageConfig, build_text2image
from training.text2image import prompt_variants


@pytest.fixture(scope="module")
def encoder():
    return load_text_encoder("minilm", max_tokens=16)


@pytest.fixture(scope="module")
def pipe(encoder):
    torch.manual_seed(0)
    return Text2ImagePipeline(build_text2image("tiny"), encoder)


def test_minilm_loads_offline_from_site_packages(encoder, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hidden, mask = encoder.encode(["chest x-ray, left lower lobe nodule", "brain mri"])
    assert hidden.shape == (2, 16, 384) and mask.shape == (2, 16) and mask.dtype == torch.bool
    assert mask[0].sum() > mask[1].sum()  # the longer prompt has more tokens
    assert torch.isfinite(hidden).all()
    again, _ = encoder.encode(["brain mri"])
    torch.testing.assert_close(again[0], hidden[1])
    with pytest.raises(TextEncoderError, match="tokens"):
        encoder.encode(["word " * 40])
    with pytest.raises(TextEncoderError, match="config.json"):
        load_text_encoder("/nonexistent/encoder")


def test_model_shapes_and_modality_conditioning():
    torch.manual_seed(0)
    model = build_text2image("tiny").eval()
    x = torch.randn(2, 1, 16, 16)
    hidden, mask = torch.randn(1, 5, 384).expand(2, 5, 384), torch.ones(2, 5)
    with torch.no_grad():
        eps = model(x, torch.tensor([500, 500]), hidden, mask, torch.tensor([0, 3]))
        same = model(x, torch.tensor([500, 500]), hidden, mask, torch.tensor([0, 0]))
    assert eps.shape == (2, 1, 16, 16)
    torch.testing.assert_close(eps[0], same[0])
    assert not torch.allclose(eps[1], same[1])  # the modality embedding changes the prediction
    assert model.null_modality == 5
    with pytest.raises(ValueError, match="modalities: unknown modality 'pet'"):
        model.modality_ids(["oct", "pet"])


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="image_size"):
        Text2ImageConfig(image_size=30)
    with pytest.raises(ValueError, match="modalities"):
        Text2ImageConfig(modalities=("oct", "oct"))
    with pytest.raises(ValueError, match="block_out_channels"):
        Text2ImageConfig(block_out_channels=(30, 64))
    config = Text2ImageConfig(modalities=("a", "b"))
    assert Text2ImageConfig.from_dict(config.to_dict()) == config


def test_same_seed_same_images_other_seed_other_images(pipe):
    kwargs = dict(prompts=["chest ct, emphysema"], modalities=["chest_ct"], steps=3, guidance_scale=3.0)
    a, b = pipe.generate(**kwargs, seed=7), pipe.generate(**kwargs, seed=7)
    c = pipe.generate(**kwargs, seed=8)
    assert a.shape == (1, 16, 16) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_guidance_and_negative_prompts_change_the_output(pipe):
    kwargs = dict(prompts=["retinal oct, drusen"], modalities=["oct"], steps=3, seed=1)
    plain = pipe.sample(**kwargs, guidance_scale=1.0)
    guided = pipe.sample(**kwargs, guidance_scale=7.0)
    negative = pipe.sample(**kwargs, guidance_scale=7.0, negative_prompts=["blurry noise"])
    assert float((plain - guided).abs().max()) > 1e-4
    assert float((guided - negative).abs().max()) > 1e-4


def test_batched_prompts_match_single_prompts(pipe):
    batch = pipe.sample(["brain mri, glioma", "fundus photograph, normal fundus"], ["brain_mri", "fundus"],
                        steps=3, seed=3, num_images=2)
    assert batch.shape == (4, 1, 16, 16)
    single = pipe.sample(["fundus photograph, normal fundus"], ["fundus"], steps=3, seed=3 + 2, num_images=2)
    torch.testing.assert_close(batch[2:], single, atol=1e-4, rtol=0)  # image j of prompt i: seed + i*n + j
    assert not torch.allclose(batch[0], batch[1])  # two images of one prompt differ


def test_independent_requests_batched_together_get_their_own_images(pipe):
    from inference.generation import GenerationRequest

    guided = GenerationRequest(["chest ct, emphysema"], ["chest_ct"], ["noise"], guidance_scale=4.0, steps=3, seed=5,
                               num_images=2)
    unguided = GenerationRequest(["retinal oct, drusen"], ["oct"], guidance_scale=1.0, steps=3, seed=9)
    other_steps = GenerationRequest(["brain mri"], ["brain_mri"], steps=2, seed=1)
    together = pipe.sample_many([guided, unguided, other_steps])
    assert [tuple(t.shape) for t in together] == [(2, 1, 16, 16), (1, 1, 16, 16), (1, 1, 16, 16)]
    for request, images in zip([guided, unguided, other_steps], together, strict=True):
        alone = pipe.sample_many([request])[0]
        torch.testing.assert_close(images, alone, atol=1e-4, rtol=0)
    with pytest.raises(GenerationInputError, match="num_images: 8 prompts x 9 images = 72"):
        pipe.sample_many([GenerationRequest(["brain mri"] * 8, ["brain_mri"] * 8, num_images=9)])


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"steps": 0}, "steps"),
        ({"steps": 1001}, "steps"),
        ({"steps": 2.5}, "steps"),
        ({"guidance_scale": -1.0}, "guidance_scale"),
        ({"guidance_scale": math.nan}, "guidance_scale"),
        ({"guidance_scale": 31}, "guidance_scale"),
        ({"num_images": 0}, "num_images"),
        ({"num_images": 17}, "num_images"),
        ({"seed": -1}, "seed"),
        ({"modalities": ["pet"]}, "modalities"),
        ({"modalities": ["oct", "oct"]}, "modalities"),
        ({"prompts": "chest ct"}, "prompts"),
        ({"prompts": []}, "prompts"),
        ({"prompts": ["  "]}, "prompts"),
        ({"prompts": ["x" * 301]}, "prompts"),
        ({"prompts": ["lung " * 30]}, "prompts"),
        ({"negative_prompts": ["a", "b"]}, "negative_prompts"),
    ],
)
def test_invalid_arguments_raise_value_errors_naming_the_field(pipe, kwargs, field):
    args = dict(prompts=["chest ct"], modalities=["chest_ct"], steps=2, guidance_scale=2.0, seed=0, num_images=1)
    args.update(kwargs)
    with pytest.raises(GenerationInputError) as info:
        pipe.generate(**args)
    assert info.value.field == field and isinstance(info.value, ValueError)
    assert str(info.value).startswith(f"{field}:")


def test_prompt_variants_cover_synonyms_orders_and_dropped_findings():
    variants = prompt_variants("chest x-ray, left lower lobe nodule")
    assert variants[0] == "chest x-ray, left lower lobe nodule"
    assert "left lower lobe nodule, chest x-ray" in variants
    assert "chest radiograph showing left lower lobe nodule" in variants
    assert "chest x-ray" in variants and "frontal cxr" in variants
    assert len(variants) == len(set(variants))
    assert prompt_variants("custom modality") == ["custom modality"]


def test_train_text2image_writes_a_run_dir_that_loads_into_a_pipeline(tmp_path, encoder):
    from core.phantoms import write_dataset
    from inference.generation import load_text2image_pipeline
    from training.text2image import train_text2image
    from weights.checkpoints import load_run

    csv = write_dataset("modality", 10, tmp_path / "data", seed=0, size=32) / "captions.csv"
    model, metrics = train_text2image(csv, csv, tmp_path / "gen" / "text2image", preset="tiny", epochs=2,
                                      steps_per_epoch=2, encoder=encoder)
    assert math.isfinite(metrics["val_loss"])
    info = load_run(tmp_path / "gen" / "text2image")
    assert info.kind == "text2image" and info.config["text_encoder"]["name"] == "minilm"
    for name in ("log.csv", "curves.png", "weights.safetensors"):
        assert (tmp_path / "gen" / "text2image" / name).is_file()
    pipeline = load_text2image_pipeline(tmp_path / "gen", text_encoder=encoder)
    assert pipeline.selector is None
    images = pipeline.generate(["chest ct, emphysema"], ["chest_ct"], steps=2, seed=0)
    expected = Text2ImagePipeline(model, encoder).generate(["chest ct, emphysema"], ["chest_ct"], steps=2, seed=0)
    np.testing.assert_array_equal(images, expected)
