"""The text-to-image sampler (MiniLM prompts, DDIM, classifier-free guidance with a negative prompt) on the
seeded ``tiny`` (pixel) and ``tiny_latent`` (latent diffusion, decoded) models against stored image slices.

Regenerate after a deliberate change (of the model, the sampler or the preset): ``.venv/bin/python -m
tests.inference.test_text2image_slices``.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from core.text_encoders import load_text_encoder
from inference.generation import Text2ImagePipeline
from models.text2image import build_text2image
from tests.support.slices import assert_slice, print_slices, spread_weights_

pytestmark = pytest.mark.usefixtures("single_thread_torch")

REGENERATE = ".venv/bin/python -m tests.inference.test_text2image_slices"
# four denoising steps amplify rounding: two threads instead of one move these values by up to 7e-6
ATOL = 1e-4

# 4 DDIM steps, seed 3, guidance 2.0, two images per prompt: the top-left 3x3 of prompt 0's second image and of
# prompt 1's first, then the mean and std over the last three images (16 x 16 each)
GUIDED = np.array([
    0.0709207, 0.0693313, 0.0099857, 0.9934095, 0.0081765, 0.0242220, 0.3977240, 0.7587236,
    0.1088119, 0.1798441, 0.0226420, 0.7218386, 0.0242156, 0.5097510, 0.9764169, 0.2085800,
    0.5770379, 0.9717908, 0.4588344, 0.4021406,
])
# prompt 0 with a negative prompt in place of the unconditional branch: the top-left 3x3, mean, std
NEGATIVE = np.array([
    1.0000000, 0.0274557, 0.0000000, 0.9964716, 0.0087401, 0.0004133, 0.9979661, 0.0032923,
    0.4137852, 0.3895480, 0.4094327,
])

# tiny_latent, 4 DDIM steps, seed 3, guidance 2.0, two prompts: a 3x3 patch of each decoded 32 x 32 image, mean, std
LATENT = np.array([
    0.5357002, 0.4659058, 0.4550314, 0.4759862, 0.5146791, 0.4862510, 0.3293697, 0.4213749,
    0.4413113, 0.2970872, 0.3431863, 0.3702636, 0.4333579, 0.5112528, 0.4706545, 0.2590187,
    0.3700595, 0.4138550, 0.4316089, 0.0789935,
])


@functools.cache
def _encoder():
    return load_text_encoder("minilm", max_tokens=16)  # frozen, so one load serves both tests


def _pipe(preset: str = "tiny") -> Text2ImagePipeline:
    torch.manual_seed(0)
    model = spread_weights_(build_text2image(preset), seed=0)
    if model.autoencoder is not None:  # He-normal decoders saturate images at 0 and 1: scale the last conv
        with torch.no_grad():
            model.autoencoder.vae.decoder.conv_out.weight.mul_(0.05)
    return Text2ImagePipeline(model, _encoder())


def guided_slice() -> np.ndarray:
    images = _pipe().sample(["chest x-ray, left lower lobe nodule", "brain mri, glioma"], ["chest_xray", "brain_mri"],
                            guidance_scale=2.0, steps=4, seed=3, num_images=2)  # (4, 1, 16, 16)
    picked = [images[1, 0, :3, :3].flatten(), images[2, 0, :3, :3].flatten(), images[1:].mean()[None],
              images[1:].std()[None]]
    return torch.cat(picked).numpy()


def negative_slice() -> np.ndarray:
    images = _pipe().sample(["retinal oct, drusen"], ["oct"], negative_prompts=["blurry noise"],
                            guidance_scale=3.0, steps=4, seed=5)  # (1, 1, 16, 16)
    return torch.cat([images[0, 0, :3, :3].flatten(), images.mean()[None], images.std()[None]]).numpy()


def latent_slice() -> np.ndarray:
    images = _pipe("tiny_latent").sample(["chest ct, emphysema", "fundus photograph"], ["chest_ct", "fundus"],
                                         guidance_scale=2.0, steps=4, seed=3)  # (2, 1, 32, 32), decoded latents
    picked = [images[0, 0, 10:13, 10:13].flatten(), images[1, 0, 20:23, 4:7].flatten(), images.mean()[None],
              images.std()[None]]
    return torch.cat(picked).numpy()


def test_guided_samples_match_the_stored_slice():
    assert_slice(guided_slice(), GUIDED, REGENERATE, atol=ATOL)


def test_negative_prompt_samples_match_the_stored_slice():
    assert_slice(negative_slice(), NEGATIVE, REGENERATE, atol=ATOL)


def test_latent_samples_match_the_stored_slice():
    assert_slice(latent_slice(), LATENT, REGENERATE, atol=ATOL)


if __name__ == "__main__":
    print_slices({"GUIDED": guided_slice, "NEGATIVE": negative_slice, "LATENT": latent_slice})
