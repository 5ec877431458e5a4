"""A simulated annotator that corrects a served mask toward the phantom truth through the real API: accept when
the automatic mask is good enough, else a box, then clicks in the largest error region (/refine), up to a prompt
budget, undoing a prompt that made the mask worse; a brush stands for whatever pixels are still wrong."""

from __future__ import annotations

import base64
import io
import time
from dataclasses import dataclass

import httpx
import numpy as np
from scipy import ndimage

from core import metrics
from core.imageio import encode_png


@dataclass(frozen=True)
class AnnotatorConfig:
    """``target_dice``: good enough to stop prompting; ``max_prompts``: box + clicks per image; ``box_jitter_px``:
    how far (at most) a drawn box edge misses the lesion's bounding box."""

    target_dice: float = 0.9
    max_prompts: int = 5
    box_jitter_px: int = 3


@dataclass(frozen=True)
class Correction:
    """One image's session: Dice of the automatic mask and after the prompts, prompts used, pixels left for the
    brush, the API time it took; ``mask``: the saved mask ``(H, W) uint8 in {0, 1}`` (the truth: the brush fixed
    the rest)."""

    dice_automatic: float
    dice_prompted: float
    prompts: int
    brush_pixels: int
    seconds: float
    model_version: str
    mask: np.ndarray


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two ``(H, W)`` masks (nonzero = lesion) by the project's one Dice; 1.0 when both are empty."""
    return metrics.dice(pred.astype(bool), truth.astype(bool))


def decode_mask(b64: str) -> np.ndarray:
    from PIL import Image

    return (np.asarray(Image.open(io.BytesIO(base64.b64decode(b64)))) > 127).astype(np.uint8)


def worst_error_click(pred: np.ndarray, truth: np.ndarray) -> tuple[list[float], int] | None:
    """The click an annotator makes: the point deepest inside the largest connected error region (missed lesion
    -> label 1, false lesion -> label 0), as ``([x, y], label)``; None when nothing is wrong."""
    error = pred.astype(bool) ^ truth.astype(bool)
    labels, count = ndimage.label(error)
    if count == 0:
        return None
    sizes = ndimage.sum(error, labels, index=range(1, count + 1))
    region = labels == (int(np.argmax(sizes)) + 1)
    depth = ndimage.distance_transform_edt(region)
    y, x = np.unravel_index(int(np.argmax(depth)), depth.shape)
    return [float(x) + 0.5, float(y) + 0.5], int(truth[y, x] > 0)


def jittered_box(truth: np.ndarray, rng: np.random.Generator, jitter: int) -> list[float]:
    """The lesion's bounding box ``[x0, y0, x1, y1]`` (pixel edges), each edge moved by up to ``jitter`` px."""
    ys, xs = np.nonzero(truth)
    h, w = truth.shape
    box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], float)
    box += rng.integers(-jitter, jitter + 1, size=4)
    return [float(np.clip(box[0], 0, w - 1)), float(np.clip(box[1], 0, h - 1)),
            float(np.clip(box[2], box[0] + 1, w)), float(np.clip(box[3], box[1] + 1, h))]


def correct(client: httpx.Client, image: np.ndarray, truth: np.ndarray, *, model: str | None,
            config: AnnotatorConfig, rng: np.random.Generator) -> Correction:
    """One session: ``image (H, W) uint8``, ``truth (H, W) {0, 1}``; ``model``: the version to segment with
    (``name:N``; None: the server's production)."""
    png = encode_png(image)
    fields = {"model": model} if model else {}
    started = time.perf_counter()
    answer = _post(client, "/segment", png, {**fields, "outputs": "mask"})
    version = answer["model"]["version"]
    pred = decode_mask(answer["mask_png_base64"])
    automatic = current = best = dice(pred, truth)
    kept = pred  # a prompt that makes the mask worse is undone (it still counts as a prompt)
    prompts, box, points, labels = 0, None, [], []
    while best < config.target_dice and prompts < config.max_prompts and truth.any():
        if box is None:
            box = jittered_box(truth, rng, config.box_jitter_px)
        else:
            click = worst_error_click(pred, truth)
            if click is None:
                break
            points.append(click[0])
            labels.append(click[1])
        form = {**fields, "outputs": "mask", "box": _json(box)}
        if points:
            form.update(points=_json(points), point_labels=_json(labels))
        pred = decode_mask(_post(client, "/refine", png, form)["mask_png_base64"])
        prompts += 1
        current = dice(pred, truth)
        if current > best:
            best, kept = current, pred
    return Correction(automatic, best, prompts, int((kept.astype(bool) ^ truth.astype(bool)).sum()),
                      time.perf_counter() - started, version, truth.astype(np.uint8))


def _json(value: object) -> str:
    import json

    return json.dumps(value)


def _post(client: httpx.Client, path: str, png: bytes, data: dict[str, str]) -> dict:
    response = client.post(path, data=data, files={"file": ("image.png", png, "image/png")})
    if response.status_code != 200:
        raise RuntimeError(f"{path} answered {response.status_code}: {response.text[:300]}")
    return response.json()
