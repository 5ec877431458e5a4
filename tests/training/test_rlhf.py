"""training.rlhf: the simulated rater on constructed images, the reward model on a synthetic rating, and the
reward-weighted fine-tune on a toy pool; models.reward as a best-of-N scorer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from training.rlhf import (
    RaterConfig,
    RLHFConfig,
    SimulatedRater,
    real_phantoms,
    rwr_weights,
    spearman,
    train_reward,
    weighted_finetune,
)

NOISE_LEVELS = (0.0, 0.03, 0.06, 0.1, 0.15, 0.25)


@pytest.fixture(scope="module")
def committed_selector():
    from weights.generators import GENERATORS_DIR, load_selector

    return load_selector(GENERATORS_DIR / "selector")


def _noisy(images: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
    return (images + sigma * noise).clamp(0.0, 1.0)


def test_rater_rates_real_phantoms_high_and_is_monotone_in_added_noise(committed_selector, single_thread_torch):
    rater = SimulatedRater.from_phantoms(committed_selector, 32, per_modality=20)
    real = real_phantoms(25, 32, seed=5, modalities=list(rater.modalities))  # not the rater's reference
    ids = rater.modality_ids(real.modalities)
    clean = rater(real.images, ids)
    assert float(clean.rating.float().mean()) >= 4.0
    defects, ratings = [], []
    for sigma in NOISE_LEVELS:
        scores = rater(_noisy(real.images, sigma, seed=1), ids)
        defects.append(scores.defect)
        ratings.append(scores.rating)
    for before, after in zip(defects, defects[1:], strict=False):
        assert bool((after >= before - 1e-6).all())  # per image: more noise never lowers the defect
    for before, after in zip(ratings, ratings[1:], strict=False):
        assert bool((after <= before).all())
    assert int(ratings[-1].max()) <= 2  # sigma 0.25: heavy noise is rated 1-2 everywhere


def test_rater_rates_the_wrong_modality_one_star(committed_selector, single_thread_torch):
    rater = SimulatedRater.from_phantoms(committed_selector, 32, per_modality=10)
    real = real_phantoms(10, 32, seed=6, modalities=["oct"])
    asked = rater(real.images, rater.modality_ids(["brain_mri"] * 10))
    assert asked.rating.tolist() == [1] * 10
    assert float(asked.p_modality.max()) < 0.5


def test_rater_config_rejects_unordered_thresholds():
    with pytest.raises(ValueError, match="thresholds"):
        RaterConfig(thresholds=(0.5, 0.2, 0.8, 1.0))


def test_reward_model_learns_a_synthetic_rating(single_thread_torch):
    from models.selector import build_selector

    torch.manual_seed(0)
    selector = build_selector("tiny").eval()  # untrained: the filter energies must carry the rating
    real = real_phantoms(120, 32, seed=11)
    levels = torch.arange(120) % 5  # rating 5 - level: the noise level decides it
    sigmas = torch.tensor([0.0, 0.04, 0.08, 0.13, 0.2])[levels]
    noise = torch.randn(real.images.shape, generator=torch.Generator().manual_seed(3))
    images = (real.images + sigmas[:, None, None, None] * noise).clamp(0.0, 1.0)
    ratings = (5 - levels).float()
    ids = torch.tensor([list(selector.config.modalities).index(m) for m in real.modalities])
    model, metrics = train_reward(images, ids, ratings, selector, preset="tiny",
                                  config=_reward_config(steps=300), seed=0)
    assert metrics["n_val"] == 24
    assert metrics["spearman_val"] > 0.8
    # ...and it ranks a fresh set the same way
    fresh = real_phantoms(50, 32, seed=12)
    fresh_levels = torch.arange(50) % 5
    fresh_noise = torch.randn(fresh.images.shape, generator=torch.Generator().manual_seed(4))
    x = (fresh.images + torch.tensor([0.0, 0.04, 0.08, 0.13, 0.2])[fresh_levels][:, None, None, None]
         * fresh_noise).clamp(0.0, 1.0)
    with torch.no_grad():
        predicted = model.score(x, model.modality_ids(fresh.modalities))
    assert spearman(predicted.numpy(), (5 - fresh_levels).numpy()) > 0.8
    assert float(predicted.min()) > 1.0 and float(predicted.max()) < 5.0


def _reward_config(steps: int):
    from training.rlhf import RewardTrainConfig

    return RewardTrainConfig(steps=steps, lr=1e-2)


def test_rwr_weights_favour_higher_reward_within_each_group():
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 4.5, 5.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    w = rwr_weights(rewards, groups, temperature=0.5)
    assert torch.allclose(w[:3].mean(), torch.tensor(1.0)) and torch.allclose(w[3:].mean(), torch.tensor(1.0))
    assert bool((w[1:3] > w[:2]).all()) and bool((w[4:] > w[3:5]).all())
    assert float(w[2] / w[0]) == pytest.approx(np.exp(4.0), rel=1e-5)  # exp((3 - 1) / 0.5)


def _toy_finetune(bright_reward: float, dark_reward: float):
    from core.text_encoders import load_text_encoder
    from models.text2image import build_text2image
    from training.rlhf import generate

    torch.manual_seed(0)
    base = build_text2image("tiny")
    encoder = load_text_encoder("minilm", max_tokens=base.config.max_text_tokens)
    n = 32
    bright = torch.arange(n) % 2 == 0
    pool = torch.where(bright[:, None, None, None], torch.full((n, 1, 16, 16), 0.85), torch.full((n, 1, 16, 16), 0.15))
    rewards = torch.where(bright, torch.tensor(bright_reward), torch.tensor(dark_reward))
    modalities = ["oct"] * n
    weights = rwr_weights(rewards, torch.zeros(n, dtype=torch.long), temperature=0.5)
    config = RLHFConfig(steps=60, batch_size=8, lr=3e-3, real_weight=0.0, p_uncond=0.0)
    result = weighted_finetune(base, encoder, pool, ["retinal oct"] * n, modalities, weights, None, config=config)

    from inference.generation import Text2ImagePipeline

    pipe = Text2ImagePipeline(result.model, encoder)
    images = generate(pipe, [("retinal oct", "oct", 100 + i) for i in range(8)], steps=10, guidance_scale=1.0)
    return float(images.mean())


def test_reward_weighting_moves_the_model_toward_higher_reward_samples(single_thread_torch):
    """Same pool (half bright, half dark), same steps and seeds: only the rewards differ."""
    toward_bright = _toy_finetune(bright_reward=5.0, dark_reward=1.0)
    toward_dark = _toy_finetune(bright_reward=1.0, dark_reward=5.0)
    assert toward_bright > 0.6
    assert toward_dark < 0.4


def test_reward_model_ranks_best_of_n(committed_selector, single_thread_torch, tmp_path):
    """The reward model as the pipeline's best-of-N scorer keeps the candidate it rates highest."""
    from inference.generation import Text2ImagePipeline
    from inference.reward_scorer import load_reward_scorer, with_scorer
    from models.reward import build_reward
    from models.text2image import build_text2image
    from training.rlhf import RewardTrainConfig, save_reward_run

    reward = build_reward("tiny", committed_selector)
    save_reward_run(tmp_path / "reward", reward, {}, n_ratings=0, config=RewardTrainConfig(), seed=0,
                    ratings_source="none")
    scorer = load_reward_scorer(tmp_path / "reward")

    class _Encoder:
        dim, max_tokens = 8, 16

    denoiser = build_text2image({"image_size": 16, "patch_size": 1, "block_out_channels": [4, 8],
                                 "attention_head_dim": 4, "norm_num_groups": 2, "cross_attention_dim": 8,
                                 "text_dim": 8, "max_text_tokens": 16})
    pipe = with_scorer(Text2ImagePipeline(denoiser, _Encoder()), scorer)
    candidates = torch.rand(2 * 3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    chosen, scores = pipe.select_best(candidates, ["oct", "fundus"], 3)
    with torch.no_grad():
        expected = scorer.score(candidates, torch.tensor([0, 0, 0, 1, 1, 1])).view(2, 3)
    assert np.allclose(scores, expected.max(dim=1).values.numpy(), atol=1e-6)
    best = expected.argmax(dim=1)
    for k in range(2):
        want = np.round(candidates[3 * k + int(best[k]), 0].numpy() * 255.0).astype(np.uint8)
        assert np.array_equal(chosen[k], want)


def _degraded_pool(n: int, seed: int) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """``n`` real phantoms with Gaussian noise of a per-image sigma in [0, 0.12] (a generator's varying quality)."""
    real = real_phantoms(n, 32, seed=seed)
    sigmas = torch.linspace(0.0, 0.12, n)[torch.randperm(n, generator=torch.Generator().manual_seed(seed))]
    noise = torch.randn(real.images.shape, generator=torch.Generator().manual_seed(seed + 1))
    return (real.images + sigmas[:, None, None, None] * noise).clamp(0.0, 1.0), real.modalities, sigmas


def test_calibrated_rater_spreads_a_new_pool_over_the_whole_scale(committed_selector, single_thread_torch):
    rater = SimulatedRater.from_phantoms(committed_selector, 32, per_modality=10)
    images, modalities, _ = _degraded_pool(100, seed=30)
    before = rater(images, rater.modality_ids(modalities)).rating
    calibration = rater.calibrate(images, rater.modality_ids(modalities))
    assert set(calibration["thresholds"]) == set(rater.modalities)
    # a fresh pool of the same kind (other phantoms, other noise), rated by the frozen calibrated rater
    fresh, fresh_modalities, sigmas = _degraded_pool(100, seed=31)
    scores = rater(fresh, rater.modality_ids(fresh_modalities))
    counts = torch.bincount(scores.rating, minlength=6)[1:]
    assert int(counts.min()) >= 8 and int(counts.max()) <= 35, counts.tolist()  # every star used, none dominant
    assert int(torch.bincount(before, minlength=6)[1:].max()) > int(counts.max())  # the fixed scale bunched up
    order = sigmas.argsort()
    assert float(scores.rating[order[:20]].float().mean()) > float(scores.rating[order[-20:]].float().mean()) + 1.5


def test_rater_roundtrip_reference_discounts_the_autoencoders_smoothing(committed_selector, single_thread_torch):
    """With a smoothing round trip as reference, smoothed phantoms have the reference's noise energy."""
    def blur(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.avg_pool2d(torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1)

    real = real_phantoms(20, 32, seed=7)
    plain = SimulatedRater.from_phantoms(committed_selector, 32, per_modality=10)
    smoothed = SimulatedRater.from_phantoms(committed_selector, 32, per_modality=10, roundtrip=blur)
    ids = plain.modality_ids(real.modalities)
    off = torch.log2(plain(blur(real.images), ids).noise_ratio).abs()
    on = torch.log2(smoothed(blur(real.images), ids).noise_ratio).abs()
    assert float(off.median()) > 1.0 and float(on.median()) < 0.5


def test_best_of_ratings_regenerate_the_image_generate_kept(committed_selector, single_thread_torch):
    """A rated best-of image (the UI's "keep the best") trains the reward model on that image, not on candidate 0:
    its candidates are drawn again and ranked again by the same scorer, the selector or the reward model."""
    from inference.generation import load_text2image_pipeline, to_uint8
    from inference.reward_scorer import with_scorer
    from models.reward import build_reward
    from training.rlhf import RatedImage, regenerate

    pipe = load_text2image_pipeline("default")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        reward = build_reward("tiny", committed_selector).eval()
    request = {"prompt": "retinal oct, drusen", "modality": "oct", "seed": 40, "steps": 3, "guidance_scale": 1.5}
    ratings = [RatedImage(**request, rating=4, best_of=3), RatedImage(**request, rating=2, best_of=3, rank_by="reward"),
               RatedImage(**request, rating=3, index=2)]
    images = to_uint8(regenerate(pipe, ratings, reward_scorer=reward))
    args = ([request["prompt"]], [request["modality"]])
    kwargs = {"steps": 3, "seed": 40, "guidance_scale": 1.5}
    by_selector, _ = pipe.generate_best_of(*args, candidates=3, **kwargs)
    by_reward, _ = with_scorer(pipe, reward).generate_best_of(*args, candidates=3, **kwargs)
    candidates = pipe.generate(*args, num_images=3, **kwargs)
    np.testing.assert_array_equal(images[0], by_selector[0])
    assert not np.array_equal(images[0], candidates[0])  # the selector kept another candidate than the first
    np.testing.assert_array_equal(images[1], by_reward[0])
    np.testing.assert_array_equal(images[2], candidates[2])
    with pytest.raises(ValueError, match=r"ratings\[1\]: rank_by 'reward' needs the reward model"):
        regenerate(pipe, ratings)


@pytest.mark.parametrize(("change", "needle"), [
    ({"seed_offset": 1}, r"ratings\[0\]\.seed_offset: unknown field"),
    ({"best_of": 3, "index": 1}, r"ratings\[0\]\.best_of = 3 \(index 1\)"),
    ({"best_of": 0}, r"ratings\[0\]\.best_of = 0"),
    ({"rank_by": "reward"}, r"ratings\[0\]\.rank_by = 'reward'; .* with best_of"),
    ({"best_of": 2, "rank_by": "stars"}, r"ratings\[0\]\.rank_by = 'stars'"),
])
def test_read_ratings_refuses_what_would_regenerate_another_image(tmp_path, change, needle):
    from training.rlhf import read_ratings

    entry = {"prompt": "oct", "modality": "oct", "seed": 1, "steps": 3, "guidance_scale": 1.5, "rating": 3}
    path = tmp_path / "ratings.json"
    path.write_text(json.dumps({"ratings": [entry | change]}))
    with pytest.raises(ValueError, match=needle):
        read_ratings(path)
    path.write_text(json.dumps({"ratings": [entry | {"best_of": 2, "rank_by": "reward"}]}))
    assert read_ratings(path)[0].rank_by == "reward"
