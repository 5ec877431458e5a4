"""core.datasets: folder / ZIP / MINIM CSV readers, every error path, fingerprints and splits."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest

from core.datasets import (
    CaptionDataset,
    DatasetError,
    SegmentationDataset,
    data_fingerprint,
    kfold_split,
    read_captions_csv,
    train_val_test_split,
)
from core.imageio import encode_mask_png, encode_png


def _pair(seed: int, shape=(20, 24)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, shape, dtype=np.uint8)
    mask = np.zeros(shape, np.uint8)
    mask[2 + seed % 5 : 12, 3:15] = 1
    return image, mask


def _make_folder(root: Path, names=("a", "b", "c"), mask_suffix="", shape=(20, 24)) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i, name in enumerate(names):
        image, mask = _pair(i, shape)
        (root / "images" / f"{name}.png").write_bytes(encode_png(image))
        (root / "masks" / f"{name}{mask_suffix}.png").write_bytes(encode_mask_png(mask))
    return root


def _zip_bytes(root: Path, prefix: str = "", extra: dict[str, bytes] | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                archive.writestr(prefix + path.relative_to(root).as_posix(), path.read_bytes())
        for name, data in (extra or {}).items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _problem(exc_info) -> str:
    return str(exc_info.value)


# ------------------------------------------------------------------------------------------------- readers


def test_folder_reader_returns_sorted_samples(tmp_path):
    root = _make_folder(tmp_path / "data", names=("c", "a", "b"))
    dataset = SegmentationDataset(root)
    assert dataset.names == ["a", "b", "c"] and len(dataset) == 3
    image, mask, name = dataset[0]
    expected_image, expected_mask = _pair(1)  # "a" was written second
    assert name == "a" and image.dtype == np.float32 and mask.dtype == np.uint8
    np.testing.assert_allclose(image, expected_image / 255.0, atol=1e-7)
    np.testing.assert_array_equal(mask, expected_mask)
    assert dataset.files("a") == ("images/a.png", "masks/a.png")
    assert [s.name for s in dataset] == ["a", "b", "c"]


def test_busi_mask_suffix_other_extension_and_resize(tmp_path):
    root = _make_folder(tmp_path / "busi", names=("benign (1)", "malignant (2)"), mask_suffix="_mask")
    image, _ = _pair(7)
    (root / "images" / "benign (1).png").unlink()
    (root / "images" / "benign (1).jpg").write_bytes(_jpeg(image))
    dataset = SegmentationDataset(root, size=(10, 12))
    assert dataset.names == ["benign (1)", "malignant (2)"]
    assert dataset.files("benign (1)") == ("images/benign (1).jpg", "masks/benign (1)_mask.png")
    sample = dataset[1]
    assert sample.image.shape == (10, 12) and sample.mask.shape == (10, 12)
    assert set(np.unique(sample.mask)) <= {0, 1} and sample.mask.any()
    assert 0.0 <= sample.image.min() and sample.image.max() <= 1.0


def _jpeg(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def test_zip_file_zip_bytes_and_prefixed_zip_match_the_folder(tmp_path):
    root = _make_folder(tmp_path / "data")
    folder = SegmentationDataset(root)
    litter = {"__MACOSX/data/images/._a.png": b"resource fork", "data/.DS_Store": b"finder"}
    prefixed = _zip_bytes(root, prefix="data/", extra=litter)
    archive = tmp_path / "upload.zip"
    archive.write_bytes(_zip_bytes(root))
    for dataset in (SegmentationDataset(archive), SegmentationDataset(prefixed)):
        assert dataset.names == folder.names
        for ours, theirs in zip(dataset, folder, strict=True):
            np.testing.assert_array_equal(ours.image, theirs.image)
            np.testing.assert_array_equal(ours.mask, theirs.mask)
        assert data_fingerprint(dataset) == data_fingerprint(folder)
    with pytest.raises(DatasetError, match="uploaded ZIP: not a readable ZIP archive"):
        SegmentationDataset(b"PK\x03\x04 broken")


# -------------------------------------------------------------------------------------------- error paths


def test_missing_masks_are_all_listed(tmp_path):
    root = _make_folder(tmp_path / "data", names=("a", "b", "c"))
    (root / "masks" / "a.png").unlink()
    (root / "masks" / "c.png").unlink()
    with pytest.raises(DatasetError) as exc_info:
        SegmentationDataset(root)
    message = _problem(exc_info)
    assert "2 images have no mask" in message and "images/a.png" in message and "images/c.png" in message
    assert "images/b.png" not in message


def test_mask_without_image_and_ambiguous_masks(tmp_path):
    root = _make_folder(tmp_path / "data", names=("a", "b"))
    (root / "masks" / "ghost.png").write_bytes(encode_mask_png(np.zeros((4, 4), np.uint8)))
    (root / "masks" / "a_mask.png").write_bytes(encode_mask_png(np.zeros((4, 4), np.uint8)))
    with pytest.raises(DatasetError) as exc_info:
        SegmentationDataset(root)
    message = _problem(exc_info)
    assert "1 masks have no image: masks/ghost.png" in message
    assert "images with several masks: masks/a.png / masks/a_mask.png" in message


def test_empty_and_wrong_layouts(tmp_path):
    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    (empty / "masks").mkdir()
    with pytest.raises(DatasetError, match=r"empty: no images in images/"):
        SegmentationDataset(empty)
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "a.png").write_bytes(encode_png(np.zeros((4, 4), np.uint8)))
    with pytest.raises(DatasetError, match=r"expected images/ and masks/ folders, found: a.png"):
        SegmentationDataset(flat)
    with pytest.raises(DatasetError, match=r"nowhere: no such folder or file"):
        SegmentationDataset(tmp_path / "nowhere")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(DatasetError, match="is neither a folder nor a ZIP archive"):
        SegmentationDataset(text)


def test_unsupported_duplicate_and_nested_files(tmp_path):
    root = _make_folder(tmp_path / "data", names=("a", "b"))
    (root / "images" / "README.txt").write_text("notes")
    (root / "images" / "b.jpg").write_bytes(_jpeg(_pair(1)[0]))
    (root / "images" / "sub").mkdir()
    (root / "images" / "sub" / "c.png").write_bytes(encode_png(_pair(2)[0]))
    with pytest.raises(DatasetError) as exc_info:
        SegmentationDataset(root)
    message = _problem(exc_info)
    assert "unsupported file types" in message and "images/README.txt" in message
    assert "images sharing a name: images/b.jpg, images/b.png" in message
    assert "nested folders are not supported: images/sub/c.png" in message


def test_unreadable_files_and_size_mismatch_are_listed_at_construction(tmp_path):
    root = _make_folder(tmp_path / "data", names=("a", "b", "c"))
    (root / "images" / "a.png").write_bytes(b"definitely not a png")
    (root / "masks" / "c.png").write_bytes(encode_mask_png(np.zeros((5, 5), np.uint8)))
    with pytest.raises(DatasetError) as exc_info:
        SegmentationDataset(root)
    message = _problem(exc_info)
    assert "1 unreadable files: images/a.png: not an image" in message
    assert "masks/c.png is 5x5 (HxW) but images/c.png is 20x24 (HxW)" in message
    # Without validation the same faults surface when the sample is read, never silently.
    lazy = SegmentationDataset(root, validate=False)
    assert lazy.names == ["a", "b", "c"]
    assert lazy[1].name == "b"
    with pytest.raises(DatasetError, match="images/a.png: not an image"):
        lazy[0]
    with pytest.raises(DatasetError, match="masks/c.png is 5x5"):
        lazy[2]


def test_byte_limit_applies_to_zip_members(tmp_path):
    root = _make_folder(tmp_path / "data", names=("a",))
    with pytest.raises(DatasetError, match=r"unreadable files: images/a.png: \d+ bytes, over 10 bytes"):
        SegmentationDataset(_zip_bytes(root), max_bytes=10)


# -------------------------------------------------------------------------------------------------- CSV


def _write_csv(root: Path, rows: list[str], header: str = "path,text,modal") -> Path:
    csv_path = root / "captions.csv"
    csv_path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return csv_path


def test_minim_csv_reader(tmp_path):
    (tmp_path / "images").mkdir()
    for name in ("x.png", "y.png"):
        (tmp_path / "images" / name).write_bytes(encode_png(_pair(3)[0]))
    csv_path = _write_csv(
        tmp_path,
        [
            'images/y.png,"chest x-ray, left lower lobe nodule",chest_xray',
            "images/x.png,retinal oct drusen,oct",
        ],
    )
    dataset = CaptionDataset(csv_path, size=8)
    assert dataset.names == ["images/x.png", "images/y.png"] and dataset.modalities == ["chest_xray", "oct"]
    sample = dataset[1]
    assert sample.text == "chest x-ray, left lower lobe nodule" and sample.modal == "chest_xray"
    assert sample.image.shape == (8, 8) and sample.image.dtype == np.float32
    before = data_fingerprint(dataset)
    csv_path.write_text(csv_path.read_text().replace("drusen", "normal"))
    assert data_fingerprint(CaptionDataset(csv_path)) != before  # captions are part of the data


def test_minim_csv_errors_name_lines_and_files(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "x.png").write_bytes(encode_png(_pair(3)[0]))
    (tmp_path / "images" / "bad.png").write_text("nope")
    with pytest.raises(DatasetError, match=r"missing columns modal \(header is path, text\)"):
        read_captions_csv(_write_csv(tmp_path, ["images/x.png,a"], header="path,text"))
    rows = ["images/x.png,a caption,oct", "images/gone.png,b,oct", "images/x.png,dup,oct", ",c,oct"]
    with pytest.raises(DatasetError) as exc_info:
        read_captions_csv(_write_csv(tmp_path, rows))
    message = _problem(exc_info)
    assert "empty fields on line 5 (path)" in message
    assert "duplicate paths on line 4 (images/x.png)" in message
    assert "1 image files not found: images/gone.png (line 3)" in message
    with pytest.raises(DatasetError, match=r"unreadable images: images/bad.png \(line 2"):
        CaptionDataset(_write_csv(tmp_path, ["images/bad.png,a,oct"]))
    with pytest.raises(DatasetError, match="no rows"):
        read_captions_csv(_write_csv(tmp_path, []))


# ----------------------------------------------------------------------------------- fingerprint, splits


def test_fingerprint_tracks_names_and_bytes(tmp_path):
    root = _make_folder(tmp_path / "data")
    dataset = SegmentationDataset(root)
    first = data_fingerprint(dataset)
    assert len(first) == 64 and first == data_fingerprint(SegmentationDataset(root, size=8))
    assert data_fingerprint(dataset.subset(["a", "b"])) != first
    _, mask = _pair(0)
    mask[0, 0] = 1 - mask[0, 0]
    (root / "masks" / "a.png").write_bytes(encode_mask_png(mask))
    assert data_fingerprint(SegmentationDataset(root)) != first
    with pytest.raises(KeyError, match="zzz"):
        dataset.subset(["a", "zzz"])


def test_kfold_is_deterministic_disjoint_and_covering():
    names = [f"case{i:02d}" for i in range(23)]
    vals = []
    for fold in range(5):
        train, val = kfold_split(names, k=5, fold=fold, seed=3)
        assert not set(train) & set(val) and sorted(train + val) == names
        assert len(val) in (4, 5) and val == sorted(val)
        assert (train, val) == kfold_split(list(reversed(names)), k=5, fold=fold, seed=3)
        vals.extend(val)
    assert sorted(vals) == names
    assert kfold_split(names, seed=3)[1] != kfold_split(names, seed=4)[1]
    with pytest.raises(ValueError, match=r"fold must be in \[0, 5\), got 5"):
        kfold_split(names, fold=5)
    with pytest.raises(ValueError, match="need at least k=5 names"):
        kfold_split(names[:3])
    with pytest.raises(ValueError, match="repeated: case01"):
        kfold_split(names + ["case01"])


def test_train_val_test_split():
    names = [f"n{i}" for i in range(20)]
    train, val, test = train_val_test_split(names, val=0.15, test=0.15, seed=1)
    assert (len(train), len(val), len(test)) == (14, 3, 3)
    assert sorted(train + val + test) == sorted(names)
    assert not (set(train) & set(val)) and not (set(train) & set(test)) and not (set(val) & set(test))
    assert (train, val, test) == train_val_test_split(names[::-1], seed=1)
    assert [len(s) for s in train_val_test_split(names[:4], val=0.1, test=0.1)] == [2, 1, 1]
    with pytest.raises(ValueError, match="too few"):
        train_val_test_split(names[:2])
    with pytest.raises(ValueError, match="val \\+ test must be < 1"):
        train_val_test_split(names, val=0.5, test=0.5)
