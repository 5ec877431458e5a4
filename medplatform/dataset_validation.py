"""Validate an extracted upload with core's readers: core.datasets pairs the files (its rules decide), every
pair is decoded with core.imageio under the pixel limit, and each fault is attributed to the file at fault."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.datasets import (
    IMAGE_EXTENSIONS,
    MASK_SUFFIX,
    DatasetError,
    SegmentationDataset,
    _find_root,  # core's own rules, so the explanation of a layout error cannot drift from the verdict
    _FolderSource,
    _is_litter,
    _split_extension,
)
from core.imageio import ImageDecodeError, decode_image, decode_mask, detect_format
from medplatform.dataset_limits import DatasetLimits


@dataclass(frozen=True)
class Validation:
    """What an upload holds.

    Attributes:
        files: every non-litter file, relative POSIX path under the extraction folder.
        root: ``''`` or ``'dir/'``, the prefix under which ``images/`` and ``masks/`` live.
        pairs: sample name -> ``(image path, mask path)`` (relative, with ``root``), when the layout is valid.
        faults: path -> reason, one entry per file at fault (empty when valid).
        problems: core.datasets' messages for the layout (they may name no single file, e.g. no images/).
        stats: counts and sizes (``pairs``, ``formats``, ``min_hw``/``max_hw``, ``empty_masks``...).
        formats: path -> core.imageio format of each decoded file.
    """

    files: list[str]
    root: str
    pairs: dict[str, tuple[str, str]]
    faults: dict[str, str]
    problems: list[str]
    stats: dict[str, Any]
    formats: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.faults and not self.problems


def validate_folder(folder: Path, limits: DatasetLimits) -> Validation:
    """Pair and decode every file under ``folder`` (an extracted upload); never raises for bad content."""
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    files = [f for f in files if not _is_litter(f)]
    try:
        dataset = SegmentationDataset(folder, validate=False, max_pixels=limits.max_pixels,
                                      max_bytes=limits.max_file_bytes)
    except DatasetError as exc:
        root, faults = _layout_faults(folder, files)
        return Validation(files, root, {}, faults, list(exc.problems), {"files": len(files)})
    pairs = {name: dataset.files(name) for name in dataset.names}
    root = _find_root(_FolderSource(folder), files)
    faults: dict[str, str] = {}
    formats: dict[str, str] = {}
    shapes: list[tuple[int, int]] = []
    foreground: list[float] = []
    for image_path, mask_path in pairs.values():
        image = _decode(folder, image_path, faults, formats, limits, mask=False)
        mask = _decode(folder, mask_path, faults, formats, limits, mask=True)
        if image is None or mask is None:
            continue
        if image.shape != mask.shape:
            faults[mask_path] = (f"mask is {mask.shape[0]}x{mask.shape[1]} (HxW) but its image {image_path} "
                                 f"is {image.shape[0]}x{image.shape[1]}")
            continue
        shapes.append(image.shape)
        foreground.append(float(mask.mean()))
    stats: dict[str, Any] = {
        "pairs": len(pairs),
        "images": len(pairs),
        "masks": len(pairs),
        "files": len(files),
        "formats": dict(sorted(Counter(formats[p[0]] for p in pairs.values() if p[0] in formats).items())),
    }
    if shapes:
        heights, widths = [s[0] for s in shapes], [s[1] for s in shapes]
        stats.update(min_hw=[min(heights), min(widths)], max_hw=[max(heights), max(widths)],
                     empty_masks=sum(1 for f in foreground if f == 0.0),
                     foreground_mean=round(float(np.mean(foreground)), 6))
    return Validation(files, root, pairs, faults, [], stats, formats)


def _decode(folder: Path, relative: str, faults: dict[str, str], formats: dict[str, str],
            limits: DatasetLimits, *, mask: bool) -> np.ndarray | None:
    path = folder / relative
    size = path.stat().st_size
    if size > limits.max_file_bytes:
        faults[relative] = f"{size} bytes, over the per-file limit of {limits.max_file_bytes}"
        return None
    data = path.read_bytes()
    try:
        if mask:  # core's binarisation rule: {0,1}, 0/255 or 0/65535, anything else ambiguous and refused
            pixels = decode_mask(data, name=relative, max_pixels=limits.max_pixels, max_bytes=limits.max_file_bytes)
        else:
            pixels = decode_image(data, name=relative, max_pixels=limits.max_pixels,
                                  max_bytes=limits.max_file_bytes).pixels
    except (ImageDecodeError, OSError) as exc:
        message = str(exc)
        faults[relative] = message[len(relative) + 2:] if message.startswith(relative + ": ") else message
        return None
    formats[relative] = detect_format(data) or "unknown"
    return pixels


def _layout_faults(folder: Path, files: list[str]) -> tuple[str, dict[str, str]]:
    """Attribute core.datasets' layout refusal to files, following its pairing rules file by file."""
    try:
        root = _find_root(_FolderSource(folder), files)
    except DatasetError:
        return "", {}  # no images/ + masks/ pair of folders: no single file is at fault
    faults: dict[str, str] = {}
    images: dict[str, list[str]] = {}
    masks: dict[str, list[str]] = {}
    for relative in files:
        if not relative.startswith(root):
            continue
        top, _, filename = relative[len(root):].partition("/")
        if top not in ("images", "masks"):
            continue
        if "/" in filename:
            faults[relative] = f"nested folder inside {top}/ (files must sit directly in images/ and masks/)"
            continue
        split = _split_extension(filename)
        if split is None:
            faults[relative] = f"unsupported file type (expected {' '.join(IMAGE_EXTENSIONS)})"
            continue
        (images if top == "images" else masks).setdefault(split[0], []).append(relative)
    used: set[str] = set()
    for name, image_paths in sorted(images.items()):
        if len(image_paths) > 1:
            for path in image_paths:
                faults[path] = f"several images share the name {name!r}: {', '.join(image_paths)}"
        candidates = masks.get(name, []) + masks.get(name + MASK_SUFFIX, [])
        if not candidates:
            faults[image_paths[0]] = f"no mask (looked for {root}masks/{name}.* and {root}masks/{name}{MASK_SUFFIX}.*)"
        elif len(candidates) > 1:
            for path in candidates:
                faults[path] = f"one of several masks for {image_paths[0]}: {', '.join(candidates)}"
        used.update(candidates)
    for paths in masks.values():
        for path in paths:
            if path not in used:
                faults[path] = (
                    f"mask without an image (expected {root}images/NAME.* for masks/NAME.* or NAME{MASK_SUFFIX}.*)"
                )
    return root, faults
