"""The denoising loop's ``wanted`` hook: a request nobody waits for leaves the shared loop at its next step,
its neighbours keep their exact images, and a loop with no request left stops (issue #15, item 5)."""

from __future__ import annotations

import pytest
import torch

from core.text_encoders import load_text_encoder
from inference.generation import GenerationRequest, Text2ImagePipeline
from models.text2image import build_text2image


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    return Text2ImagePipeline(build_text2image("tiny"), load_text_encoder("minilm", max_tokens=16))


def test_a_dropped_request_leaves_the_loop_and_its_neighbours_keep_their_images(pipe):
    guided = GenerationRequest(["chest ct, emphysema"], ["chest_ct"], ["noise"], guidance_scale=4.0, steps=6, seed=5,
                               num_images=2)
    dropped = GenerationRequest(["retinal oct, drusen"], ["oct"], guidance_scale=2.0, steps=6, seed=9, num_images=3)
    unguided = GenerationRequest(["brain mri"], ["brain_mri"], guidance_scale=1.0, steps=6, seed=1)
    asked: list[tuple[int, int]] = []  # (request, step) per question

    def wanted(i: int) -> bool:
        step = sum(1 for j, _ in asked if j == i)
        asked.append((i, step))
        return not (i == 1 and step >= 2)  # request 1 leaves before its third step

    together = pipe.sample_many([guided, dropped, unguided], wanted=wanted)
    assert together[1] is None
    assert sum(1 for i, _ in asked if i == 1) == 3  # asked before steps 1-3, never again
    assert sum(1 for i, _ in asked if i != 1) == 2 * 6
    for request, images in ((guided, together[0]), (unguided, together[2])):
        torch.testing.assert_close(images, pipe.sample_many([request])[0], atol=1e-4, rtol=0)


def test_the_loop_stops_when_no_request_is_left(pipe):
    requests = [GenerationRequest(["brain mri"], ["brain_mri"], steps=50, seed=s) for s in range(2)]
    asked = []

    def wanted(i: int) -> bool:
        asked.append(i)
        return len(asked) <= 4  # both requests run two steps, then nobody waits

    assert pipe.sample_many(requests, wanted=wanted) == [None, None]
    assert len(asked) == 6  # two steps of two requests, then one question each: the other 48 steps never ran
