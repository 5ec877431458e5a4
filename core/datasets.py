"""Readers for a user's own data: a folder or ZIP of ``images/`` + ``masks/``, and the MINIM caption CSV
(layouts and checks: docs/architecture.md, "core").
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import zipfile
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import NamedTuple

import numpy as np
from PIL import Image

from core.imageio import ImageDecodeError, decode_image, decode_mask, read_image

IMAGE_EXTENSIONS = (".nii.gz", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm", ".dicom", ".nii")
MASK_SUFFIX = "_mask"
CSV_COLUMNS = ("path", "text", "modal")
_LIST_LIMIT = 50  # names listed per problem in an error message


class DatasetError(ValueError):
    """A data set does not fit its layout; ``problems`` holds one line per fault, each naming files."""

    def __init__(self, source: str, problems: Sequence[str]):
        self.source = source
        self.problems = list(problems)
        super().__init__(f"data set {source}: " + "; ".join(self.problems))


class Sample(NamedTuple):
    """One segmentation sample: ``image (H, W) float32 in [0, 1]``, ``mask (H, W) uint8 in {0, 1}``, name."""

    image: np.ndarray
    mask: np.ndarray
    name: str


class CaptionSample(NamedTuple):
    """A captioned image: ``image (H, W) float32 in [0, 1]``, caption, modality, name (the CSV path)."""

    image: np.ndarray
    text: str
    modal: str
    name: str


class CaptionRecord(NamedTuple):
    """A MINIM CSV row: ``path`` as written, ``file`` resolved, ``text``, ``modal``, 1-based ``line``."""

    path: str
    file: Path
    text: str
    modal: str
    line: int


def _listing(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_LIST_LIMIT])
    return shown + (f" ... and {len(items) - _LIST_LIMIT} more" if len(items) > _LIST_LIMIT else "")


def _split_extension(filename: str) -> tuple[str, str] | None:
    lower = filename.lower()
    for extension in IMAGE_EXTENSIONS:
        if lower.endswith(extension) and len(filename) > len(extension):
            return filename[: -len(extension)], extension
    return None


def _normalise_size(size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    pair = (int(size), int(size)) if isinstance(size, (int, np.integer)) else tuple(int(s) for s in size)
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(f"size must be a positive int or (height, width), got {size!r}")
    return pair  # type: ignore[return-value]


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize ``(H, W) float32 in [0, 1]`` to ``size = (height, width)`` bilinearly (antialiased)."""
    if image.shape == size:
        return image
    resized = Image.fromarray(np.asarray(image, np.float32)).resize(
        (size[1], size[0]), Image.Resampling.BILINEAR
    )
    return np.clip(np.asarray(resized, np.float32), 0.0, 1.0)


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize ``(H, W) uint8 {0, 1}`` to ``size = (height, width)`` with nearest neighbour."""
    if mask.shape == size:
        return mask
    resized = Image.fromarray(np.asarray(mask, np.uint8)).resize((size[1], size[0]), Image.Resampling.NEAREST)
    return np.asarray(resized, np.uint8)


# ----------------------------------------------------------------------------------------------------------
# Sources: a folder or a ZIP, both seen as relative POSIX paths -> bytes
# ----------------------------------------------------------------------------------------------------------


class _FolderSource:
    def __init__(self, root: Path):
        self.root = root
        self.label = str(root)

    def files(self) -> list[str]:
        return [p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file()]

    def dirs(self) -> list[str]:
        return [p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_dir()]

    def size(self, relative: str) -> int:
        return (self.root / relative).stat().st_size

    def read(self, relative: str) -> bytes:
        return (self.root / relative).read_bytes()


class _ZipSource:
    def __init__(self, data: bytes | Path, label: str):
        self.label = label
        self._data = data
        try:
            self._zip = self._open()
        except (zipfile.BadZipFile, OSError) as exc:
            raise DatasetError(label, [f"not a readable ZIP archive ({exc})"]) from exc
        self._infos = {info.filename: info for info in self._zip.infolist() if not info.is_dir()}
        self._dirs = {info.filename.rstrip("/") for info in self._zip.infolist() if info.is_dir()}
        for filename in self._infos:  # folders implied by member paths
            self._dirs.update(str(parent) for parent in PurePosixPath(filename).parents if str(parent) != ".")

    def files(self) -> list[str]:
        return list(self._infos)

    def dirs(self) -> list[str]:
        return sorted(self._dirs)

    def size(self, relative: str) -> int:
        return self._infos[relative].file_size

    def read(self, relative: str) -> bytes:
        if self._pid != os.getpid():  # a forked DataLoader worker must not share the parent's file offset
            self._zip = self._open()
        return self._zip.read(self._infos[relative])

    def _open(self) -> zipfile.ZipFile:
        self._pid = os.getpid()
        return zipfile.ZipFile(io.BytesIO(self._data) if isinstance(self._data, bytes) else self._data)


def _is_litter(relative: str) -> bool:
    parts = PurePosixPath(relative).parts
    return any(part.startswith(".") or part == "__MACOSX" for part in parts) or parts[-1] == "Thumbs.db"


def _find_root(source: _FolderSource | _ZipSource, files: list[str]) -> str:
    """The prefix ('' or 'dir/') under which images/ and masks/ live."""
    dirs = {d for d in source.dirs() if not _is_litter(d)}
    roots = []
    for folder in sorted(dirs):
        path = PurePosixPath(folder)
        if path.name == "images" and str(path.with_name("masks")) in dirs:
            roots.append("" if str(path.parent) == "." else f"{path.parent}/")
    if len(roots) == 1:
        return roots[0]
    if not roots:
        top = sorted({d + "/" for d in dirs if "/" not in d} | {f for f in files if "/" not in f})
        found = _listing(top) if top else "nothing"
        raise DatasetError(source.label, [f"expected images/ and masks/ folders, found: {found}"])
    raise DatasetError(source.label, [f"several images/ + masks/ folder pairs, keep one: {_listing(roots)}"])


# ----------------------------------------------------------------------------------------------------------
# Segmentation data set
# ----------------------------------------------------------------------------------------------------------


class SegmentationDataset:
    """Image/mask pairs from a folder, a ZIP file or ZIP bytes (layout in the module docstring).

    ``dataset[i]`` is a :class:`Sample` ``(image (H, W) float32 in [0, 1], mask (H, W) uint8 {0, 1}, name)``,
    resized to ``size`` when given (image bilinear, mask nearest). Items are sorted by name. No torch needed;
    the object works as a ``torch.utils.data.Dataset``.

    Args:
        source: a folder, a ``.zip`` file path, or the bytes of a ZIP archive.
        size: ``None`` (native size), an int (square) or ``(height, width)``.
        validate: decode every pair now and raise one :class:`DatasetError` listing unreadable files and
            size mismatches (layout errors are always raised at construction).
        max_pixels, max_bytes: decode limits per file, passed to :mod:`core.imageio`.
        label: how messages name ZIP bytes (default ``"uploaded ZIP"``).

    Raises:
        DatasetError: missing/unknown layout, missing masks, masks without images, unsupported files,
            duplicate names, empty ``images/``, and with ``validate`` unreadable files and size mismatches.
    """

    def __init__(
        self,
        source: str | os.PathLike[str] | bytes,
        *,
        size: int | Sequence[int] | None = None,
        validate: bool = True,
        max_pixels: int | None = None,
        max_bytes: int | None = None,
        label: str = "uploaded ZIP",
    ):
        self.size = _normalise_size(size)
        self.max_pixels, self.max_bytes = max_pixels, max_bytes
        self._source = _open_source(source, label)
        self.label = self._source.label
        self._pairs = _match_pairs(self._source)  # name -> (image path, mask path)
        self._names = sorted(self._pairs)
        if validate:
            self.validate()

    @classmethod
    def _subset(cls, parent: SegmentationDataset, names: list[str]) -> SegmentationDataset:
        child = cls.__new__(cls)
        child.__dict__.update(parent.__dict__)
        child._names = names
        return child

    @property
    def names(self) -> list[str]:
        """Sample names (image file names without extension), sorted."""
        return list(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __getitem__(self, index: int) -> Sample:
        name = self._names[index]
        image, mask = self._load(name)
        if self.size is not None:
            image, mask = resize_image(image, self.size), resize_mask(mask, self.size)
        return Sample(image, mask, name)

    def __iter__(self) -> Iterator[Sample]:
        for index in range(len(self)):
            yield self[index]

    def files(self, name: str) -> tuple[str, str]:
        """``(image path, mask path)`` of ``name``, relative to the data set root."""
        return self._pairs[name]

    def subset(self, names: Iterable[str]) -> SegmentationDataset:
        """A view holding only ``names`` (e.g. one split), in sorted order.

        Raises:
            KeyError: a name that is not in the data set (all unknown names listed).
        """
        wanted = sorted(set(names))
        unknown = [n for n in wanted if n not in self._pairs]
        if unknown:
            raise KeyError(f"names not in data set {self.label}: {_listing(unknown)}")
        return SegmentationDataset._subset(self, wanted)

    def raw_items(self) -> Iterator[tuple[str, list[bytes]]]:
        """``(name, [image bytes, mask bytes])`` per sample in name order (for :func:`data_fingerprint`)."""
        for name in self._names:
            image_path, mask_path = self._pairs[name]
            yield name, [self._source.read(image_path), self._source.read(mask_path)]

    def validate(self) -> None:
        """Decode every pair; raise one :class:`DatasetError` listing unreadable files and size mismatches."""
        unreadable, mismatched = [], []
        for name in self._names:
            image_path, mask_path = self._pairs[name]
            try:
                image = self._decode_image(image_path)
            except (ImageDecodeError, OSError) as exc:
                unreadable.append(_failure(image_path, exc))
                image = None
            try:
                mask = self._decode_mask(mask_path)
            except (ImageDecodeError, OSError) as exc:
                unreadable.append(_failure(mask_path, exc))
                mask = None
            if image is not None and mask is not None and image.shape != mask.shape:
                mismatched.append(f"{mask_path} is {_hw(mask.shape)} but {image_path} is {_hw(image.shape)}")
        problems = []
        if unreadable:
            problems.append(f"{len(unreadable)} unreadable files: {_listing(unreadable)}")
        if mismatched:
            problems.append(
                f"{len(mismatched)} masks differ in size from their image: {_listing(mismatched)}"
            )
        if problems:
            raise DatasetError(self.label, problems)

    def _decode_image(self, relative: str) -> np.ndarray:
        self._check_bytes(relative)
        data = self._source.read(relative)
        return decode_image(data, name=relative, max_pixels=self.max_pixels, max_bytes=self.max_bytes).pixels

    def _decode_mask(self, relative: str) -> np.ndarray:
        self._check_bytes(relative)
        data = self._source.read(relative)
        return decode_mask(data, name=relative, max_pixels=self.max_pixels, max_bytes=self.max_bytes)

    def _check_bytes(self, relative: str) -> None:
        if self.max_bytes is not None and self._source.size(relative) > self.max_bytes:
            raise ImageDecodeError(
                f"{relative}: {self._source.size(relative)} bytes, over {self.max_bytes} bytes"
            )

    def _load(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        image_path, mask_path = self._pairs[name]
        decoded = []
        for path, decode in ((image_path, self._decode_image), (mask_path, self._decode_mask)):
            try:
                decoded.append(decode(path))
            except (ImageDecodeError, OSError) as exc:
                raise DatasetError(self.label, [f"unreadable file {_failure(path, exc)}"]) from exc
        image, mask = decoded
        if image.shape != mask.shape:
            raise DatasetError(
                self.label, [f"{mask_path} is {_hw(mask.shape)} but {image_path} is {_hw(image.shape)}"]
            )
        return image, mask


def _failure(relative: str, exc: Exception) -> str:
    """``exc`` as one listing entry that starts with the file (decode errors already do)."""
    message = str(exc)
    return message if message.startswith(relative) else f"{relative}: {message}"


def _hw(shape: tuple[int, ...]) -> str:
    return f"{shape[0]}x{shape[1]} (HxW)"


def _open_source(source: str | os.PathLike[str] | bytes, label: str) -> _FolderSource | _ZipSource:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _ZipSource(bytes(source), label)
    path = Path(source)
    if path.is_dir():
        return _FolderSource(path)
    if path.is_file():
        if not zipfile.is_zipfile(path):
            raise DatasetError(str(path), ["is neither a folder nor a ZIP archive"])
        return _ZipSource(path, str(path))
    raise DatasetError(str(path), ["no such folder or file"])


def _match_pairs(source: _FolderSource | _ZipSource) -> dict[str, tuple[str, str]]:
    files = [f for f in source.files() if not _is_litter(f)]
    root = _find_root(source, files)
    problems: list[str] = []
    images: dict[str, list[str]] = {}
    masks: dict[str, list[str]] = {}
    unsupported, nested = [], []
    for relative in sorted(files):
        if not relative.startswith(root):
            continue  # outside the data set root (e.g. a README beside data/)
        inner = relative[len(root) :]
        folder, _, filename = inner.partition("/")
        if folder not in ("images", "masks"):
            continue
        if "/" in filename:
            nested.append(relative)
            continue
        split = _split_extension(filename)
        if split is None:
            unsupported.append(relative)
            continue
        (images if folder == "images" else masks).setdefault(split[0], []).append(relative)
    if nested:
        problems.append(f"nested folders are not supported: {_listing(nested)}")
    if unsupported:
        problems.append(
            f"unsupported file types (expected {' '.join(IMAGE_EXTENSIONS)}): {_listing(unsupported)}"
        )
    duplicates = [", ".join(paths) for paths in images.values() if len(paths) > 1]
    if duplicates:
        problems.append(f"images sharing a name: {_listing(duplicates)}")
    pairs: dict[str, tuple[str, str]] = {}
    missing, ambiguous = [], []
    used: set[str] = set()
    for name, image_paths in sorted(images.items()):
        candidates = masks.get(name, []) + masks.get(name + MASK_SUFFIX, [])
        if not candidates:
            missing.append(image_paths[0])
        elif len(candidates) > 1:
            ambiguous.append(" / ".join(candidates))
        else:
            pairs[name] = (image_paths[0], candidates[0])
        used.update(candidates)
    orphans = sorted(p for paths in masks.values() for p in paths if p not in used)
    if missing:
        problems.append(
            f"{len(missing)} images have no mask (looked for masks/NAME.* and masks/NAME{MASK_SUFFIX}.*): "
            f"{_listing(missing)}"
        )
    if ambiguous:
        problems.append(f"images with several masks: {_listing(ambiguous)}")
    if orphans:
        problems.append(f"{len(orphans)} masks have no image: {_listing(orphans)}")
    if not images and not problems:
        problems.append(f"no images in {root}images/")
    if problems:
        raise DatasetError(source.label, problems)
    return pairs


# ----------------------------------------------------------------------------------------------------------
# MINIM caption CSV
# ----------------------------------------------------------------------------------------------------------


def read_captions_csv(path: str | os.PathLike[str]) -> list[CaptionRecord]:
    """Read and check a MINIM CSV ``path,text,modal``; paths are resolved relative to the CSV's folder.

    Raises:
        DatasetError: unreadable CSV, missing columns, empty fields, duplicate paths, missing image files or
            no rows (every offending line or file is listed).
    """
    csv_path = Path(path)
    label = str(csv_path)
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(label, [f"cannot read CSV ({exc})"]) from exc
    reader = csv.DictReader(io.StringIO(text))
    header = [h.strip() for h in (reader.fieldnames or [])]
    absent = [c for c in CSV_COLUMNS if c not in header]
    if absent:
        raise DatasetError(
            label, [f"missing columns {', '.join(absent)} (header is {', '.join(header) or 'empty'})"]
        )
    reader.fieldnames = header
    records: list[CaptionRecord] = []
    empty, duplicates, missing = [], [], []
    seen: set[str] = set()
    for row in reader:
        line = reader.line_num
        values = {c: (row.get(c) or "").strip() for c in CSV_COLUMNS}
        blank = [c for c in CSV_COLUMNS if not values[c]]
        if blank:
            empty.append(f"line {line} ({', '.join(blank)})")
            continue
        if values["path"] in seen:
            duplicates.append(f"line {line} ({values['path']})")
            continue
        seen.add(values["path"])
        file = Path(values["path"])
        file = file if file.is_absolute() else csv_path.parent / file
        if not file.is_file():
            missing.append(f"{values['path']} (line {line})")
        records.append(CaptionRecord(values["path"], file, values["text"], values["modal"], line))
    problems = []
    if empty:
        problems.append(f"empty fields on {_listing(empty)}")
    if duplicates:
        problems.append(f"duplicate paths on {_listing(duplicates)}")
    if missing:
        problems.append(f"{len(missing)} image files not found: {_listing(missing)}")
    if not records and not problems:
        problems.append("no rows")
    if problems:
        raise DatasetError(label, problems)
    return records


class CaptionDataset:
    """Captioned images from a MINIM CSV ``path,text,modal``; ``dataset[i]`` is a :class:`CaptionSample`.

    Args:
        csv_path: the CSV; image paths are relative to its folder.
        size: ``None``, an int or ``(height, width)``; images are resized bilinearly.
        validate: decode every image now and raise one :class:`DatasetError` listing unreadable ones.
        max_pixels, max_bytes: decode limits per file.
    """

    def __init__(
        self,
        csv_path: str | os.PathLike[str],
        *,
        size: int | Sequence[int] | None = None,
        validate: bool = True,
        max_pixels: int | None = None,
        max_bytes: int | None = None,
    ):
        self.label = str(csv_path)
        self.size = _normalise_size(size)
        self.max_pixels, self.max_bytes = max_pixels, max_bytes
        self.records = sorted(read_captions_csv(csv_path), key=lambda r: r.path)
        if validate:
            unreadable = []
            for record in self.records:
                try:
                    self._decode(record)
                except ImageDecodeError as exc:
                    unreadable.append(f"{record.path} (line {record.line}: {exc})")
            if unreadable:
                raise DatasetError(
                    self.label, [f"{len(unreadable)} unreadable images: {_listing(unreadable)}"]
                )

    @property
    def names(self) -> list[str]:
        """The CSV paths, sorted."""
        return [r.path for r in self.records]

    @property
    def modalities(self) -> list[str]:
        """Distinct modalities, sorted."""
        return sorted({r.modal for r in self.records})

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> CaptionSample:
        record = self.records[index]
        try:
            image = self._decode(record)
        except ImageDecodeError as exc:
            raise DatasetError(self.label, [f"unreadable image on line {record.line}: {exc}"]) from exc
        if self.size is not None:
            image = resize_image(image, self.size)
        return CaptionSample(image, record.text, record.modal, record.path)

    def __iter__(self) -> Iterator[CaptionSample]:
        for index in range(len(self)):
            yield self[index]

    def raw_items(self) -> Iterator[tuple[str, list[bytes]]]:
        """``(path, [image bytes, text, modal as UTF-8])`` per row in path order."""
        for record in self.records:
            yield record.path, [record.file.read_bytes(), record.text.encode(), record.modal.encode()]

    def _decode(self, record: CaptionRecord) -> np.ndarray:
        return read_image(record.file, max_pixels=self.max_pixels, max_bytes=self.max_bytes).pixels


# ----------------------------------------------------------------------------------------------------------
# Fingerprint and splits
# ----------------------------------------------------------------------------------------------------------


def data_fingerprint(dataset: SegmentationDataset | CaptionDataset) -> str:
    """SHA-256 hex digest over every sample's name and raw file bytes, in name order.

    Each name and byte string is length-prefixed, so the digest changes when any name, image, mask (or
    caption) changes, and not with the folder/ZIP container or the resize ``size``.
    """
    digest = hashlib.sha256()
    for name, parts in dataset.raw_items():
        for part in [name.encode(), *parts]:
            digest.update(len(part).to_bytes(8, "little"))
            digest.update(part)
    return digest.hexdigest()


def _shuffled(names: Iterable[str], seed: int) -> list[str]:
    ordered = sorted(names)
    if len(set(ordered)) != len(ordered):
        repeated = sorted(n for n, count in Counter(ordered).items() if count > 1)
        raise ValueError(f"names must be unique, repeated: {_listing(repeated)}")
    order = np.random.default_rng(seed).permutation(len(ordered))
    return [ordered[i] for i in order]


def kfold_split(
    names: Iterable[str], k: int = 5, fold: int = 0, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Fold ``fold`` of a seeded ``k``-fold split: ``(train_names, val_names)``, each sorted.

    Names are sorted, shuffled with ``numpy.random.default_rng(seed)`` and cut into ``k`` folds whose sizes
    differ by at most one; the validation folds of ``fold = 0..k-1`` are disjoint and cover all names.

    Raises:
        ValueError: ``k < 2``, ``fold`` outside ``[0, k)``, fewer names than ``k``, or repeated names.
    """
    if k < 2:
        raise ValueError(f"k must be >= 2, got {k}")
    if not 0 <= fold < k:
        raise ValueError(f"fold must be in [0, {k}), got {fold}")
    shuffled = _shuffled(names, seed)
    if len(shuffled) < k:
        raise ValueError(f"need at least k={k} names for a {k}-fold split, got {len(shuffled)}")
    folds = np.array_split(np.arange(len(shuffled)), k)
    val = {shuffled[i] for i in folds[fold]}
    return sorted(n for n in shuffled if n not in val), sorted(val)


def train_val_test_split(
    names: Iterable[str], val: float = 0.15, test: float = 0.15, seed: int = 0
) -> tuple[list[str], list[str], list[str]]:
    """Seeded split into ``(train, val, test)`` name lists, each sorted, disjoint and together complete.

    ``round(fraction * n)`` names go to each of val and test, at least one when its fraction is > 0.

    Raises:
        ValueError: fractions outside ``[0, 1)``, ``val + test >= 1``, too few names to leave a training
            name, or repeated names.
    """
    for label, fraction in (("val", val), ("test", test)):
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"{label} fraction must be in [0, 1), got {fraction}")
    if val + test >= 1.0:
        raise ValueError(f"val + test must be < 1, got {val} + {test}")
    shuffled = _shuffled(names, seed)
    n = len(shuffled)
    n_val = max(1, round(val * n)) if val > 0 else 0
    n_test = max(1, round(test * n)) if test > 0 else 0
    if n - n_val - n_test < 1:
        raise ValueError(f"{n} names are too few for val={val}, test={test} and a non-empty training set")
    test_names = shuffled[:n_test]
    val_names = shuffled[n_test : n_test + n_val]
    train_names = shuffled[n_test + n_val :]
    return sorted(train_names), sorted(val_names), sorted(test_names)
