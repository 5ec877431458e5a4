"""``python -m loadtest rlhf`` end to end on tiny generators: ratings through the platform, reward model,
fine-tuned generators directory, and the results JSON."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def tiny_generators(tmp_path_factory):
    from core.phantoms import write_dataset
    from core.text_encoders import load_text_encoder
    from training.selector import train_selector
    from training.text2image import train_text2image

    root = tmp_path_factory.mktemp("rlhf") / "generators"
    csv = write_dataset("modality", 10, root.parent / "data", seed=0, size=32) / "captions.csv"
    encoder = load_text_encoder("minilm", max_tokens=16)
    train_selector(csv, csv, root / "selector", preset="tiny", epochs=1, steps_per_epoch=2, batch_size=5)
    train_text2image(csv, csv, root / "text2image", preset="tiny", epochs=1, steps_per_epoch=1, encoder=encoder)
    return root


def test_rlhf_loop_end_to_end_on_tiny_generators(tiny_generators, tmp_path, single_thread_torch):
    from inference.generation import load_text2image_pipeline
    from loadtest.__main__ import main
    from medplatform.context import open_platform
    from medplatform.feedback import list_generation_ratings
    from weights.checkpoints import file_sha256, read_run_json

    out, results = tmp_path / "generators", tmp_path / "rlhf.json"
    code = main(["rlhf", "--generators", str(tiny_generators), "--generators-out", str(out), "--work",
                 str(tmp_path / "work"), "--out", str(results), "--n-ratings", "12", "--n-eval", "6",
                 "--n-calibration", "40", "--n-real", "10", "--n-real-eval", "10", "--reference-per-modality", "2",
                 "--samples", "10", "--steps", "2", "--batch-size", "4", "--reward-steps", "5",
                 "--reward-preset", "tiny"])
    assert code == 0
    report = json.loads(results.read_text())
    for key in ("rlhf_win_rate", "rlhf_modality_accuracy", "fid_base", "fid_finetuned", "n_ratings",
                "reward_spearman", "machine", "load", "seconds"):
        assert key in report
    assert 0.0 <= report["rlhf_win_rate"] <= 1.0
    assert 0.0 <= report["rlhf_modality_accuracy"] <= 1.0
    assert report["n_ratings"] == 12 and report["evaluation"]["n_pairs"] == 6
    assert sum(report["rating_histogram_base_rated"].values()) == 12
    # the rater's scale was fixed on base images of its own prompts before the ratings: increasing thresholds
    calibration = report["rater_calibration"]
    assert calibration["n_images"] == 40 and sum(calibration["per_modality"].values()) == 40
    assert all(t == sorted(t) for t in calibration["thresholds"].values())
    # the ratings went through the platform and name what regenerates each image
    platform = open_platform({"MEDREFINE_DATA_DIR": str(tmp_path / "work" / "platform")},
                             bentoml_home=tmp_path / "work" / "bentoml")
    stored = list_generation_ratings(platform, "generation-ratings")
    assert len(stored) == 12 and all(1 <= r.rating <= 5 for r in stored)
    assert {r.image.steps for r in stored} == {25} and len({r.image.seed for r in stored}) == 12
    # a generators directory like the base one, recording where it came from
    run = read_run_json(out / "text2image")
    rlhf = run["config"]["rlhf"]
    assert run["kind"] == "text2image" and run["phase"] == "rlhf"
    assert rlhf["base_weights_sha256"] == file_sha256(tiny_generators / "text2image" / "weights.safetensors")
    assert rlhf["n_ratings"] == 12
    assert rlhf["reward_weights_sha256"] == file_sha256(out / "reward" / "weights.safetensors")
    assert (out / "selector" / "run.json").is_file()
    tuned = load_text2image_pipeline(out)
    assert tuned.generate(["retinal oct"], ["oct"], steps=2).shape == (1, 16, 16)
