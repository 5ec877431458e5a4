"""core.phantoms and `python -m training synth`: determinism, anatomy, distinct modalities, layouts."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from core.datasets import CaptionDataset, SegmentationDataset
from core.phantoms import (
    FINDINGS,
    KINDS,
    MODALITIES,
    MODALITY_LABELS,
    breast_ultrasound,
    chest_xray,
    is_normal_case,
    modality_image,
    sample_grid,
    write_dataset,
)
from training.__main__ import main as training_main


def test_generators_are_deterministic_and_seed_dependent():
    for make in (lambda s: breast_ultrasound(s, 64), lambda s: chest_xray(s, 64, nodule=True)):
        image, mask = make(5)
        again_image, again_mask = make(5)
        other_image, _ = make(6)
        assert image.dtype == np.uint8 and mask.dtype == np.uint8 and image.shape == (64, 64)
        np.testing.assert_array_equal(image, again_image)
        np.testing.assert_array_equal(mask, again_mask)
        assert np.mean(image != other_image) > 0.5
    for modality in MODALITIES:
        first, caption = modality_image(modality, 3)
        second, caption_again = modality_image(modality, 3)
        np.testing.assert_array_equal(first, second)
        assert caption == caption_again and first.shape == (64, 64)
        assert not np.array_equal(first, modality_image(modality, 4)[0])


def test_ultrasound_masks_are_non_empty_varied_lesions():
    fractions = []
    for seed in range(12):
        image, mask = breast_ultrasound(seed, 64)
        assert set(np.unique(mask)) == {0, 1}
        assert ndimage.label(mask)[1] == 1  # one lesion
        fractions.append(mask.mean())
        inside, outside = image[mask == 1].mean(), image[mask == 0].mean()
        assert inside < outside  # hypoechoic
    assert 0.005 < min(fractions) and max(fractions) < 0.3 and max(fractions) > 2 * min(fractions)


def test_posterior_shadowing_darkens_only_below_the_lesion():
    for seed in range(3):
        shadowed, mask = breast_ultrasound(seed, 96, shadow=True)
        plain, same_mask = breast_ultrasound(seed, 96, shadow=False)
        np.testing.assert_array_equal(mask, same_mask)
        lesion = mask.astype(bool)
        below = np.maximum.accumulate(lesion, axis=0) & ~lesion
        above = np.maximum.accumulate(lesion[::-1], axis=0)[::-1] & ~np.maximum.accumulate(lesion, axis=0)
        assert shadowed[below].mean() < 0.8 * plain[below].mean()
        assert shadowed[above].mean() == pytest.approx(plain[above].mean(), rel=0.05)


def test_chest_xray_has_two_lungs_and_the_nodule_lies_inside_them():
    for seed in range(8):
        image, lungs = chest_xray(seed, 64, nodule=seed % 2 == 1)
        labels, count = ndimage.label(lungs)
        assert count == 2
        columns = [np.nonzero(labels == k)[1].mean() for k in (1, 2)]
        assert min(columns) < 32 < max(columns)  # one lung each side of the midline
        assert image[lungs == 1].mean() < image[lungs == 0].mean()  # lungs are lucent
    plain, lungs = chest_xray(2, 128, nodule=False)
    with_nodule, same_lungs = chest_xray(2, 128, nodule=True)
    np.testing.assert_array_equal(lungs, same_lungs)
    changed = np.abs(with_nodule.astype(int) - plain.astype(int)) > 10
    assert changed.sum() > 10
    assert not (changed & ~ndimage.binary_dilation(lungs.astype(bool), iterations=2)).any()


def _features(image: np.ndarray) -> np.ndarray:
    small = np.asarray(Image.fromarray(image).resize((8, 8), Image.Resampling.BOX), np.float64).ravel() / 255
    histogram = np.histogram(image, bins=8, range=(0, 256))[0] / image.size
    return np.concatenate([small, 4 * histogram])


def test_five_modalities_are_visually_distinct_and_captioned():
    centroids = {
        m: np.mean([_features(modality_image(m, s)[0]) for s in range(8)], axis=0) for m in MODALITIES
    }
    correct = 0
    for modality in MODALITIES:
        for seed in range(100, 108):
            image, caption = modality_image(modality, seed)
            label, finding = caption.split(", ", 1)
            assert label == MODALITY_LABELS[modality] and finding in FINDINGS[modality]
            guess = min(centroids, key=lambda m: np.sum((centroids[m] - _features(image)) ** 2))
            correct += guess == modality
    assert correct == 40  # a nearest-centroid classifier on 8x8 thumbnails never confuses them
    image, caption = modality_image("chest_xray", 1, finding="left lower lobe nodule")
    assert caption == "chest x-ray, left lower lobe nodule"
    with pytest.raises(ValueError, match="unknown modality 'pet'"):
        modality_image("pet", 0)
    with pytest.raises(ValueError, match="unknown finding 'fracture' for oct"):
        modality_image("oct", 0, finding="fracture")
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        breast_ultrasound(-1)


def test_write_dataset_is_byte_identical_and_readable(tmp_path):
    first = write_dataset("ultrasound", 3, tmp_path / "a", seed=7, size=48)
    second = write_dataset("ultrasound", 3, tmp_path / "b", seed=7, size=48)
    other = write_dataset("ultrasound", 3, tmp_path / "c", seed=8, size=48)
    files = sorted(p.relative_to(first).as_posix() for p in first.rglob("*.png"))
    assert files == [
        "images/0000.png",
        "images/0001.png",
        "images/0002.png",
        "masks/0000.png",
        "masks/0001.png",
        "masks/0002.png",
    ]
    for name in files:
        assert (first / name).read_bytes() == (second / name).read_bytes()
    assert (first / "images/0000.png").read_bytes() != (other / "images/0000.png").read_bytes()
    mask = np.asarray(Image.open(first / "masks/0001.png"))
    assert set(np.unique(mask)) == {0, 255}
    dataset = SegmentationDataset(first)
    assert dataset.names == ["0000", "0001", "0002"] and dataset[0].mask.any()
    with pytest.raises(FileExistsError, match="already contains files"):
        write_dataset("ultrasound", 1, first)
    with pytest.raises(ValueError, match="unknown phantom kind 'mri'"):
        write_dataset("mri", 1, tmp_path / "d")


def test_cli_writes_minim_layout_chest_masks_and_grid(tmp_path, capsys):
    out = tmp_path / "minim"
    assert training_main(["synth", "--kind", "modality", "--n", "10", "--out", str(out), "--seed", "1"]) == 0
    assert not (out / "masks").exists()
    with open(out / "captions.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["path", "text", "modal"] and len(rows) == 11
    assert [r[2] for r in rows[1:6]] == list(MODALITIES)  # balanced: the kinds cycle
    assert all(r[1].startswith(MODALITY_LABELS[r[2]] + ", ") for r in rows[1:])
    captions = CaptionDataset(out / "captions.csv")
    assert len(captions) == 10 and captions.modalities == sorted(MODALITIES)

    chest = tmp_path / "chest"
    assert (
        training_main(["synth", "--kind", "chest_xray", "--n", "2", "--out", str(chest), "--size", "64"]) == 0
    )
    sample = SegmentationDataset(chest)[0]
    assert sample.image.shape == (64, 64) and ndimage.label(sample.mask)[1] == 2

    grid = tmp_path / "docs" / "grid.png"
    assert training_main(["synth", "--grid", str(grid)]) == 0
    with Image.open(grid) as picture:
        assert picture.mode == "RGB" and picture.width > 5 * 128 and picture.height > 3 * 128
    assert "wrote sample grid" in capsys.readouterr().out

    assert training_main(["synth", "--kind", "ultrasound", "--n", "2"]) == 2
    assert "give all of --kind, --n and --out" in capsys.readouterr().err


def test_registry_describes_every_kind():
    assert set(KINDS) == {"ultrasound", "ultrasound_mixed", "ultrasound_normal", "chest_xray", "modality"}
    assert KINDS["modality"].has_masks is False and KINDS["ultrasound"].has_masks is True
    assert KINDS["ultrasound_normal"].has_masks is True  # an empty mask is the answer "no lesion"
    sample = KINDS["modality"].sample(2, 0, 40)
    assert sample.modal == MODALITIES[2] and sample.mask is None and sample.image.shape == (40, 40)


def test_sample_grid_is_deterministic(tmp_path):
    first, second = sample_grid(tmp_path / "one.png", tile=64), sample_grid(tmp_path / "two.png", tile=64)
    assert first.read_bytes() == second.read_bytes()


def test_normal_ultrasound_has_tissue_but_no_lesion_and_mixed_sets_keep_lesion_cases():
    image, mask = breast_ultrasound(5, size=64, lesion=False)
    assert image.shape == (64, 64) and image.std() > 10 and not mask.any()
    # "ultrasound_mixed" holds normal cases at BUSI's rate; its lesion cases equal the "ultrasound" kind's.
    mixed = [KINDS["ultrasound_mixed"].sample(i, 3, 48) for i in range(30)]
    normal = [i for i, s in enumerate(mixed) if not s.mask.any()]
    assert 1 <= len(normal) <= 12 and normal == [i for i in range(30) if is_normal_case(i, 3)]
    lesion = next(i for i in range(30) if i not in normal)
    same = KINDS["ultrasound"].sample(lesion, 3, 48)
    assert np.array_equal(same.image, mixed[lesion].image) and np.array_equal(same.mask, mixed[lesion].mask)
