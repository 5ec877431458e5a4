"""medplatform.feedback's ratings of generated images on a platform under tmp_path: what is saved reads back
(oldest first, per dataset), every bad value is refused naming its field, and nothing goes to the blob store."""

from __future__ import annotations

from dataclasses import replace

import pytest

from inference.generation import GenerationLimits
from medplatform import feedback
from medplatform.errors import InvalidValue
from medplatform.feedback import GeneratedImage, GenerationRating
from tests.support.platform_fixtures import make_platform

IMAGE = GeneratedImage(prompt="chest x-ray, left lower lobe nodule", modality="chest_xray", seed=7, steps=10,
                       guidance_scale=1.5, generator_version="a" * 64)
MODALITIES = ("oct", "fundus", "chest_xray", "chest_ct", "brain_mri")


@pytest.fixture
def platform(tmp_path, monkeypatch):
    return make_platform(tmp_path, monkeypatch)


def test_ratings_and_preferences_read_back_oldest_first(platform, tmp_path):
    second = replace(IMAGE, seed=8, index=1, num_images=2, negative_prompt="blurry")
    saved = [GenerationRating(image=IMAGE, rating=4),
             GenerationRating(image=IMAGE, other=second, preferred="other"),
             GenerationRating(image=second, rating=1, dataset="ward-7")]
    rows = [feedback.save_generation_rating(platform, r, modalities=MODALITIES) for r in saved]
    assert {row.kind for row in rows} == {"generation"}
    assert all(row.image_key is None and row.mask_key is None for row in rows)
    assert feedback.list_generation_ratings(platform) == saved[:2]
    assert feedback.list_generation_ratings(platform, "ward-7") == saved[2:]
    assert rows[0].details == {"image": {"prompt": IMAGE.prompt, "modality": "chest_xray", "seed": 7, "steps": 10,
                                         "guidance_scale": 1.5, "generator_version": "a" * 64, "index": 0,
                                         "negative_prompt": None, "num_images": 1, "best_of": None,
                                         "rank_by": None},
                               "rating": 4}
    assert not (tmp_path / "var" / "blobs" / "feedback").exists()  # no blobs


def test_stored_values_are_normalised(platform):
    rating = GenerationRating(image=replace(IMAGE, guidance_scale=2, negative_prompt=""), rating=5)
    feedback.save_generation_rating(platform, rating)
    (stored,) = feedback.list_generation_ratings(platform)
    assert stored.image.guidance_scale == 2.0 and isinstance(stored.image.guidance_scale, float)
    assert stored.image.negative_prompt is None  # "" and None generate the same image


def test_generate_body_repeats_the_request():
    assert replace(IMAGE, index=2, num_images=3).generate_body() == {
        "prompt": IMAGE.prompt, "modality": "chest_xray", "seed": 7, "steps": 10, "guidance_scale": 1.5,
        "num_images": 3}
    assert replace(IMAGE, best_of=4, negative_prompt="noise").generate_body()["best_of"] == 4
    assert "rank_by" not in replace(IMAGE, best_of=4).generate_body()  # the selector, /generate's default
    assert replace(IMAGE, best_of=4, rank_by="reward").generate_body()["rank_by"] == "reward"


@pytest.mark.parametrize(("rating", "field"), [
    (GenerationRating(image=IMAGE, rating=0), "rating"),
    (GenerationRating(image=IMAGE, rating=6), "rating"),
    (GenerationRating(image=IMAGE, rating=True), "rating"),
    (GenerationRating(image=IMAGE), "rating"),
    (GenerationRating(image=IMAGE, rating=3, other=replace(IMAGE, seed=8), preferred="image"), "rating"),
    (GenerationRating(image=IMAGE, preferred="image"), "other"),
    (GenerationRating(image=IMAGE, other=replace(IMAGE, seed=8)), "preferred"),
    (GenerationRating(image=IMAGE, other=replace(IMAGE, seed=8), preferred="left"), "preferred"),
    (GenerationRating(image=IMAGE, other=replace(IMAGE, prompt="brain mri"), preferred="image"), "other"),
    (GenerationRating(image=IMAGE, other=IMAGE, preferred="image"), "other"),
    (GenerationRating(image=replace(IMAGE, modality="ultrasound"), rating=3), "image.modality"),
    (GenerationRating(image=replace(IMAGE, seed=-1), rating=3), "image.seed"),
    (GenerationRating(image=replace(IMAGE, seed=1.0), rating=3), "image.seed"),
    (GenerationRating(image=replace(IMAGE, steps=0), rating=3), "image.steps"),
    (GenerationRating(image=replace(IMAGE, steps=201), rating=3), "image.steps"),
    (GenerationRating(image=replace(IMAGE, guidance_scale=float("nan")), rating=3), "image.guidance_scale"),
    (GenerationRating(image=replace(IMAGE, guidance_scale=31.0), rating=3), "image.guidance_scale"),
    (GenerationRating(image=replace(IMAGE, prompt="  "), rating=3), "image.prompt"),
    (GenerationRating(image=replace(IMAGE, prompt="x" * 301), rating=3), "image.prompt"),
    (GenerationRating(image=replace(IMAGE, generator_version=""), rating=3), "image.generator_version"),
    (GenerationRating(image=replace(IMAGE, index=1), rating=3), "image.index"),
    (GenerationRating(image=replace(IMAGE, num_images=17), rating=3), "image.num_images"),
    (GenerationRating(image=replace(IMAGE, best_of=4, num_images=2), rating=3), "image.num_images"),
    (GenerationRating(image=replace(IMAGE, best_of=0), rating=3), "image.best_of"),
    (GenerationRating(image=replace(IMAGE, best_of=4, rank_by="best"), rating=3), "image.rank_by"),
    (GenerationRating(image=replace(IMAGE, rank_by="reward"), rating=3), "image.rank_by"),
    (GenerationRating(image=replace(IMAGE, negative_prompt=3), rating=3), "image.negative_prompt"),
    (GenerationRating(image=IMAGE, other=replace(IMAGE, seed=-2), preferred="other"), "other.seed"),
    (GenerationRating(image=IMAGE, rating=3, dataset="a\x00b"), "dataset"),
    (GenerationRating(image=IMAGE, rating=3, dataset=7), "dataset"),
])
def test_bad_values_are_refused_naming_the_field(platform, rating, field):
    with pytest.raises(InvalidValue) as caught:
        feedback.save_generation_rating(platform, rating, modalities=MODALITIES)
    assert caught.value.field == field
    assert feedback.list_generation_ratings(platform) == []


def test_the_service_limits_apply(platform):
    rating = GenerationRating(image=replace(IMAGE, steps=150), rating=3)
    with pytest.raises(InvalidValue, match="image.steps"):
        feedback.save_generation_rating(platform, rating, limits=GenerationLimits(max_steps=100))
    feedback.save_generation_rating(platform, rating)  # the pipeline's own limit is 200


@pytest.mark.parametrize(("body", "field"), [
    ({"rating": 3}, "image"),
    ({"image": [], "rating": 3}, "image"),
    ({"image": {**IMAGE.__dict__, "colour": 1}, "rating": 3}, "image.colour"),
    ({"image": {k: v for k, v in IMAGE.__dict__.items() if k != "seed"}, "rating": 3}, "image.seed"),
    ({"image": IMAGE.__dict__, "score": 3}, "score"),
])
def test_json_bodies_name_the_field(body, field):
    with pytest.raises(InvalidValue) as caught:
        feedback.rating_from_json(body)
    assert caught.value.field == field


def test_json_body_round_trip():
    body = {"image": {**IMAGE.__dict__}, "other": {**IMAGE.__dict__, "seed": 9}, "preferred": "image"}
    parsed = feedback.rating_from_json(body)
    assert parsed == GenerationRating(image=IMAGE, other=replace(IMAGE, seed=9), preferred="image")
