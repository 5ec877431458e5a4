"""``SegmentationPipeline``: the UltraRefiner chain over exported graphs, numpy in, numpy out, no web framework.
``segment`` (automatic) and ``refine`` (interactive prompts); the stages, the framing and the answer's
flags are described in docs/architecture.md ("inference").
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.errors import InputError
from inference.artifacts import Artifacts, load_artifacts
from inference.embedding_cache import DEFAULT_MAX_BYTES, CacheStats, EmbeddingCache, pixels_digest
from inference.engines import Engine, build_engine
from models.gate import GATE_TYPES, Gate, GateConfig, apply_gate
from models.interactive import pack_tokens
from models.postprocess import flip_average, keep_largest_component
from models.prompts import mask_prompt
from models.roi import crop_roi, full_image_roi, roi_from_box, to_roi_frame
from models.ultrarefiner import RoiPrompts, UltraRefinerConfig, paste_refiner_logits, resize, roi_prompts

__all__ = [
    "OUTPUT_ARRAYS",
    "InputError",
    "PromptError",
    "RefineResult",
    "SegmentOptions",
    "SegmentResult",
    "SegmentationPipeline",
]

OUTPUT_ARRAYS = ("mask", "probability", "coarse_probability", "coarse_mask", "gate")
DEFAULT_MAX_POINTS = 16
# Without a validated review threshold in the manifest: the IoU of a Dice-0.7 mask (Dice = 2 IoU / (1 + IoU)).
DEFAULT_REVIEW_IOU = 0.7 / 1.3
FLAT_IMAGE_RANGE = 1.5 / 255.0  # max - min below this (one 8-bit gray level): a blank image, "no finding"
_PROB_EPS = 1e-7  # probabilities are clamped to [eps, 1 - eps] before the logit (|logit| <= 16.1)
# A box prompt's crop window is snapped (side up to a multiple of 8 px, centre to a multiple of 4 px) so that the
# same box, or a box nudged by a pixel or two, gives the same window and so the same cached embedding.
WINDOW_SIDE_STEP = 8.0
WINDOW_CENTRE_STEP = 4.0
# Most images one TransUNet call carries when the coarse_flip rule's mirrored copies ride with the originals
# (2B images): on CPU, ONNX Runtime's time per image is flat to batch 16 and grows beyond it; OpenVINO's falls
# to batch 16. An engine's maximum batch (a TensorRT profile's) lowers it (``Engine.max_batch``).
MIRROR_MERGE_MAX_BATCH = 16


class PromptError(InputError):
    """An interactive prompt is invalid: outside the image, an inverted box, too many points, ..."""


@dataclass(frozen=True)
class SegmentOptions:
    """Per-request overrides of ``segment``.

    Attributes:
        threshold: probability threshold in (0, 1) for the masks; None = the manifest's validated one.
        gate: gate type override: "none" (refined = refiner output), "uncertainty", or the model's own
            "learned" / "hybrid" (only the type the model was exported with); None = the model's gate.
        gate_gamma, gate_min, gate_max: uncertainty-gate parameters (only with an uncertainty gate).
        outputs: which arrays to return, a subset of ``OUTPUT_ARRAYS``; the others are None.
    """

    threshold: float | None = None
    gate: str | None = None
    gate_gamma: float | None = None
    gate_min: float | None = None
    gate_max: float | None = None
    outputs: tuple[str, ...] = OUTPUT_ARRAYS

    def __post_init__(self) -> None:
        if isinstance(self.outputs, str):
            object.__setattr__(self, "outputs", (self.outputs,))
        object.__setattr__(self, "outputs", tuple(self.outputs))
        if self.threshold is not None:
            _check_number(self.threshold, "threshold", low=0.0, high=1.0, open_interval=True)
        if self.gate is not None and self.gate not in GATE_TYPES:
            raise InputError(f"gate must be one of {list(GATE_TYPES)}, got {self.gate!r}", "gate")
        if self.gate_gamma is not None:
            _check_number(self.gate_gamma, "gate_gamma", low=0.0, high=None, open_interval=True)
        for name in ("gate_min", "gate_max"):
            if getattr(self, name) is not None:
                _check_number(getattr(self, name), name, low=0.0, high=1.0, open_interval=False)
        unknown = [name for name in self.outputs if name not in OUTPUT_ARRAYS]
        if unknown:
            raise InputError(f"outputs {unknown} are unknown; choose from {list(OUTPUT_ARRAYS)}", "outputs")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> SegmentOptions:
        """Options from a request mapping; unknown keys raise ``InputError`` naming them."""
        data = dict(data or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"unknown option(s) {unknown}; expected a subset of {sorted(known)}", unknown[0])
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_number(value: Any, name: str, *, low: float, high: float | None, open_interval: bool) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float, np.floating, np.integer))
        or not np.isfinite(value)
    ):
        raise InputError(f"{name} must be a finite number, got {value!r}", name)
    value = float(value)
    if open_interval:
        ok = value > low and (high is None or value < high)
        expected = f"({low:g}, {high:g})" if high is not None else f"> {low:g}"
    else:
        ok = low <= value and (high is None or value <= high)
        expected = f"[{low:g}, {high:g}]" if high is not None else f">= {low:g}"
    if not ok:
        raise InputError(f"{name} must be in {expected}, got {value:g}", name)


@dataclass
class SegmentResult:
    """One image's segmentation, everything in the image's original (H, W) pixel frame.

    Attributes:
        mask: (H, W) uint8 {0, 1}: probability > threshold; only its largest connected component when the
            manifest's ``segment.largest_component`` says so.
        probability: (H, W) float32 in [0, 1]: the gated refined probability.
        coarse_probability: (H, W) float32 in [0, 1]: TransUNet's.
        coarse_mask: (H, W) uint8 {0, 1}: coarse_probability > threshold.
        gate: (H, W) float32 in [gate_min, gate_max]: where the refiner's correction was applied.
        box: (4,) float32 xyxy, the prompt box (pixel frame: pixel centres at integers).
        points: (2, 2) float32 xy, [positive, negative] prompt points.
        point_labels: (2,) float32 SAM codes [1, 0].
        roi: (4,) float32 xyxy square ROI the refiner saw (continuous frame: the image spans [0, W] x [0, H]).
        iou: the refiner's predicted IoU (its IoU head, trained against the actual IoU of its mask).
        needs_review: ``iou`` below the validated review threshold: a mask to check before use.
        lesion_found: the mask is non-empty (masks under the validated minimum area are answered empty).
        uncertainty: mean gate over the image (0 = coarse kept everywhere, 1 = refiner everywhere); a constant
            when the model's gate is one (gate_min == gate_max: a fixed blend, no per-pixel uncertainty).
        area_pixels: foreground pixels of ``mask``.
        area_mm2: area in mm^2 when the pixel spacing is known, else None.
        threshold: the threshold used.
        timings: per-stage wall times in ms of the batch this image was in (the same dict for every image
            of a batch).
        model_version: the artifact version that produced it.
        Arrays not requested in ``SegmentOptions.outputs`` are None.
    """

    mask: np.ndarray | None
    probability: np.ndarray | None
    coarse_probability: np.ndarray | None
    coarse_mask: np.ndarray | None
    gate: np.ndarray | None
    box: np.ndarray
    points: np.ndarray
    point_labels: np.ndarray
    roi: np.ndarray
    iou: float
    uncertainty: float
    area_pixels: int
    area_mm2: float | None
    threshold: float
    timings: dict[str, float]
    model_version: str
    needs_review: bool = False
    lesion_found: bool = True


@dataclass
class RefineResult:
    """The interactive refine result, in the image's original (H, W) pixel frame.

    Attributes:
        mask: (H, W) uint8 {0, 1}: probability > threshold.
        probability: (H, W) float32 in [0, 1]: sigmoid of the refiner's logits.
        iou: the refiner's predicted IoU.
        needs_review: ``iou`` below the validated review threshold.
        lesion_found: the mask is non-empty.
        area_pixels, area_mm2: foreground area (mm^2 when the spacing is known).
        threshold: the threshold used.
        cache_hit: True when the image embedding came from the cache (only the decoder ran).
        image_key: the cache key's image part (the caller's key or the pixels' sha256).
        timings: per-stage wall times in ms (no ``image_encoder`` entry on a cache hit).
        model_version: the artifact version that produced it.
    """

    mask: np.ndarray
    probability: np.ndarray
    iou: float
    area_pixels: int
    area_mm2: float | None
    threshold: float
    cache_hit: bool
    image_key: str
    timings: dict[str, float]
    model_version: str
    needs_review: bool = False
    lesion_found: bool = True


class _Timer:
    """Accumulates wall time per stage in milliseconds."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = {}
        self._start = time.perf_counter()

    def stage(self, name: str) -> _Stage:
        return _Stage(self, name)

    def total(self) -> dict[str, float]:
        out = {k: round(v, 3) for k, v in self.ms.items()}
        out["total"] = round((time.perf_counter() - self._start) * 1000.0, 3)
        return out


class _Stage:
    def __init__(self, timer: _Timer, name: str) -> None:
        self.timer, self.name = timer, name

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        elapsed = (time.perf_counter() - self.start) * 1000.0
        self.timer.ms[self.name] = self.timer.ms.get(self.name, 0.0) + elapsed


@dataclass
class _Group:
    """The images of one size in a ``segment`` batch, prepared for the refiner (torch, batch G)."""

    indices: list[int]  # positions in the request batch
    image: torch.Tensor  # (G, 1, H, W) in [0, 1]
    coarse: torch.Tensor  # (G, 1, H, W) coarse probability
    parts: RoiPrompts  # ROI, crop (G, 1, S, S), prompts in the ROI frame, image-frame points and box
    coords: torch.Tensor  # (G, N, 2) SAM ONNX point format, ROI frame
    labels: torch.Tensor  # (G, N)


def _area_mm2(area_pixels: int, spacing: Sequence[float] | None) -> float | None:
    if spacing is None:
        return None
    row, col = (float(v) for v in spacing)
    return float(area_pixels) * row * col


def box_ellipse(box: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(H, W) float32 {0, 1}: the ellipse inscribed in an xyxy pixel-frame box (a box prompt's mask prompt)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    rx, ry = max((x1 - x0) / 2.0, 1.0), max((y1 - y0) / 2.0, 1.0)
    ys, xs = np.ogrid[: shape[0], : shape[1]]
    return ((((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2) <= 1.0).astype(np.float32)


class SegmentationPipeline:
    """UltraRefiner inference over an artifact directory.

    Args:
        engine: runs the graphs.
        artifacts: the verified artifact directory the engine was built from.
        embedding_cache: cache for ``refine``'s image embeddings (default: one of
            ``embedding_cache_bytes``).
        embedding_cache_bytes: budget of the default cache (0 disables caching).
        max_points: most user points ``refine`` accepts.

    Thread safety: ``segment`` and ``refine`` may be called concurrently (engines and the cache are
    thread-safe; the glue holds no state).
    """

    def __init__(
        self,
        engine: Engine,
        artifacts: Artifacts,
        *,
        embedding_cache: EmbeddingCache | None = None,
        embedding_cache_bytes: int = DEFAULT_MAX_BYTES,
        max_points: int = DEFAULT_MAX_POINTS,
    ) -> None:
        self.engine = engine
        self.artifacts = artifacts
        self.embedding_cache = embedding_cache if embedding_cache is not None else EmbeddingCache(embedding_cache_bytes)
        if int(max_points) < 1:
            raise ValueError(f"max_points must be >= 1, got {max_points}")
        self.max_points = int(max_points)
        spec = artifacts.pipeline
        where = str(artifacts.root / "manifest.json")
        try:
            self.config = UltraRefinerConfig.from_dict(dict(spec.ultrarefiner))
            self.gate_config = GateConfig.from_dict(dict(spec.gate)) if spec.gate else GateConfig(type="none")
        except ValueError as exc:
            raise ValueError(f"{where}: pipeline block: {exc}") from exc
        self.transunet_size = spec.transunet_size
        self.transunet_channels = spec.transunet_in_channels
        self.refiner_size = spec.refiner_size
        self.mask_prompt_size = self._mask_input_side(artifacts)
        self.threshold = spec.threshold
        block = artifacts.manifest.get("pipeline") or {}
        self.review = dict(block.get("review") or {"iou_threshold": DEFAULT_REVIEW_IOU, "method": "default"})
        self.no_finding = dict(block.get("no_finding") or {"min_area_fraction": 0.0})
        # The automatic answer's calibrated rules (training.calibration.choose_segment_rules); off when absent.
        self.segment_rules = {"coarse_flip": False, "largest_component": False, **dict(block.get("segment") or {})}
        self.review_threshold = float(self.review["iou_threshold"])
        limit = engine.max_batch("transunet")
        self.mirror_merge_batch = MIRROR_MERGE_MAX_BATCH if limit is None else min(MIRROR_MERGE_MAX_BATCH, limit)
        self.min_area_fraction = float(self.no_finding["min_area_fraction"])
        if self.gate_config.type in ("learned", "hybrid") and "gate" not in engine.graph_names:
            raise ValueError(f"{where}: gate type {self.gate_config.type!r} needs a 'gate' graph; the engine has "
                             f"{list(engine.graph_names)}")
        if self.config.multimask_output or (self.config.use_box and not self.config.use_points):
            # The exported decoder picks its mask by SAM's ONNX rule (single-mask token for > 2 prompt points).
            warnings.warn(
                f"{where}: the model decodes with multimask_output={self.config.multimask_output}, "
                f"use_points={self.config.use_points}, use_box={self.config.use_box}; the exported single-mask "
                "decoder selects masks by SAM's ONNX rule, so refined masks may differ from the torch model",
                stacklevel=2,
            )

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_artifacts(
        cls,
        art_dir: str | Path,
        backend: str = "onnxruntime",
        *,
        embedding_cache: EmbeddingCache | None = None,
        embedding_cache_bytes: int = DEFAULT_MAX_BYTES,
        max_points: int = DEFAULT_MAX_POINTS,
        **engine_opts: Any,
    ) -> SegmentationPipeline:
        """Verify ``art_dir`` (sha256 of every graph) and build the pipeline on ``backend``.

        Raises:
            ArtifactError: the directory does not verify.
            ValueError: unknown backend (names the choices) or bad engine options.
        """
        artifacts = load_artifacts(art_dir)
        engine = build_engine(backend, artifacts, **engine_opts)
        return cls(
            engine,
            artifacts,
            embedding_cache=embedding_cache,
            embedding_cache_bytes=embedding_cache_bytes,
            max_points=max_points,
        )

    @staticmethod
    def _mask_input_side(artifacts: Artifacts) -> int:
        for spec in artifacts.graph("mask_decoder").inputs:
            if spec.get("name") == "mask_input" and isinstance(spec.get("shape", [None])[-1], int):
                return int(spec["shape"][-1])
        return artifacts.pipeline.refiner_size // 4

    @property
    def version(self) -> str:
        return self.artifacts.version

    @property
    def preferred_batch_sizes(self) -> tuple[int, ...]:
        """Image batch sizes ``segment`` runs without splitting an engine call (the engine's static shapes;
        the mirrored TransUNet pass doubles a batch of up to 8 into one of them). Empty: any size."""
        return self.engine.preferred_batch_sizes()

    def model_info(self) -> dict[str, Any]:
        """Version, backend, threshold, graphs and the pipeline settings (no server paths)."""
        described = self.engine.describe()
        return {
            "version": self.artifacts.version,
            "backend": described.get("backend", self.engine.backend),
            "engine": described,
            "threshold": self.threshold,
            "precision": self.artifacts.precision,
            "graphs": sorted(self.artifacts.graphs),
            "transunet_size": self.transunet_size,
            "refiner_size": self.refiner_size,
            "refiner_preprocess": self.artifacts.pipeline.refiner_preprocess,
            "gate": self.gate_config.to_dict(),
            "ultrarefiner": self.config.to_dict(),
            "max_points": self.max_points,
            "review": self.review,
            "no_finding": self.no_finding,
            "segment": self.segment_rules,
            "metrics": dict(self.artifacts.source.get("metrics") or {}),
            "data_fingerprint": self.artifacts.source.get("data_fingerprint"),
        }

    def cache_stats(self) -> CacheStats:
        return self.embedding_cache.stats()

    def warmup(self) -> dict[str, float]:
        """Run every graph once on a synthetic image (first-call allocations, kernel selection).

        Does not touch the embedding cache. Returns the segment timings in ms.
        """
        size = max(self.transunet_size, 32)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        image = 0.3 + 0.4 * np.exp(-((yy - size / 2) ** 2 + (xx - size / 2) ** 2) / (2 * (size / 6) ** 2))
        result = self.segment([image.astype(np.float32)], SegmentOptions(outputs=("mask",)))[0]
        self._refine(image.astype(np.float32), np.array([size / 4, size / 4, 3 * size / 4, 3 * size / 4]),
                     None, None, None, None, None, None, use_cache=False)
        return result.timings

    # ------------------------------------------------------------------ input checks
    @staticmethod
    def _check_image(image: Any, where: str) -> np.ndarray:
        return SegmentationPipeline._checked_image(image, where)[0]

    @staticmethod
    def _checked_image(image: Any, where: str) -> tuple[np.ndarray, bool]:
        """The image as contiguous float32 and whether it is blank (max - min < ``FLAT_IMAGE_RANGE``)."""
        if not isinstance(image, np.ndarray):
            raise InputError(f"{where} must be a numpy array (H, W) float32 in [0, 1], got {type(image).__name__}",
                             "image")
        if image.ndim != 2 or min(image.shape) < 2:
            raise InputError(f"{where} must be 2-D (H, W) with H, W >= 2, got shape {image.shape}", "image")
        if not np.issubdtype(image.dtype, np.floating):
            raise InputError(f"{where} must be float in [0, 1], got dtype {image.dtype} (scale integers first)",
                             "image")
        image = np.ascontiguousarray(image, dtype=np.float32)
        low, high = float(image.min()), float(image.max())  # NaN anywhere makes both NaN, +-inf reaches one
        if not (np.isfinite(low) and np.isfinite(high)):
            raise InputError(f"{where} holds NaN or infinite values", "image")
        if low < 0.0 or high > 1.0:
            raise InputError(f"{where} values must be in [0, 1], got [{low:g}, {high:g}]", "image")
        return image, bool(np.float32(high) - np.float32(low) < FLAT_IMAGE_RANGE)  # float32, as the image

    def _effective_gate(self, options: SegmentOptions) -> tuple[GateConfig, bool]:
        """(gate config, use the gate graph) for these options."""
        base = self.gate_config
        # option names = GateConfig field names
        given = {name: value for name, value in (("gate_gamma", options.gate_gamma), ("gate_min", options.gate_min),
                                                 ("gate_max", options.gate_max)) if value is not None}
        gate_type = options.gate or base.type
        if gate_type in ("learned", "hybrid"):
            if gate_type != base.type:
                raise InputError(f"gate {gate_type!r} is not available: this model's gate is {base.type!r} "
                                 "(override with 'none' or 'uncertainty')", "gate")
            if given:
                raise InputError(f"gate parameter overrides {sorted(given)} apply to the 'uncertainty' gate only; "
                                 f"this model's gate is {base.type!r}", sorted(given)[0])
            return base, True
        try:
            config = dataclasses.replace(base, type=gate_type, **given)
        except ValueError as exc:
            raise InputError(str(exc).replace("GateConfig.", ""), "gate") from exc
        return config, False

    # ------------------------------------------------------------------ segment
    def segment(
        self,
        images: Sequence[np.ndarray],
        options: SegmentOptions | None = None,
        *,
        spacings: Sequence[Sequence[float] | None] | None = None,
    ) -> list[SegmentResult]:
        """Segment a batch of images of any sizes.

        Args:
            images: each (H_i, W_i) float32 in [0, 1].
            options: overrides (threshold, gate, outputs); None = the manifest's settings.
            spacings: per image (row, column) pixel spacing in mm, or None, for ``area_mm2``.

        Returns:
            One ``SegmentResult`` per image, in order, in each image's original frame.

        Raises:
            InputError: an image is not (H, W) float in [0, 1], a bad option or spacing.
        """
        # 1. Check inputs
        options = options if options is not None else SegmentOptions()
        threshold = float(options.threshold) if options.threshold is not None else self.threshold
        gate_config, gate_graph = self._effective_gate(options)
        checked = [self._checked_image(image, f"images[{i}]") for i, image in enumerate(images)]
        arrays, flat = [a for a, _ in checked], [f for _, f in checked]
        if spacings is not None and len(spacings) != len(arrays):
            raise InputError(f"spacings has {len(spacings)} entries for {len(arrays)} images", "spacings")
        if not arrays:
            return []
        timer = _Timer()
        cfg = self.config
        with torch.inference_mode():
            # 2. TransUNet on the whole batch at its input size (images grouped by size: the glue runs per group)
            with timer.stage("preprocess"):
                sizes: dict[tuple[int, int], list[int]] = {}
                for i, a in enumerate(arrays):
                    sizes.setdefault(a.shape, []).append(i)
                order = [i for indices in sizes.values() for i in indices]  # refiner batch order
                stacks = [torch.from_numpy(np.stack([arrays[i] for i in indices]))[:, None]
                          for indices in sizes.values()]  # (G, 1, H, W) per size
                batch = torch.cat([resize(t, (self.transunet_size, self.transunet_size)) for t in stacks])
                batch = batch.expand(-1, self.transunet_channels, -1, -1)
            with timer.stage("transunet"):
                probability, mirrored = self._coarse_passes(batch)
            # 3. Coarse probability at each image's size, prompts, ROI, crops
            with timer.stage("prompts_roi"):
                # logits back from the graph's probability (in float64, then float32 like the model's own
                # logits: resizing and the sigmoid in float64 changed no value by more than 1 ulp)
                logits = torch.logit(torch.from_numpy(probability).double(), eps=_PROB_EPS)
                if mirrored is not None:
                    logits = flip_average(logits, torch.logit(torch.from_numpy(mirrored).double(), eps=_PROB_EPS))
                logits = logits.float()
                groups, offset = [], 0
                for indices, image in zip(sizes.values(), stacks, strict=True):
                    rows = logits[offset : offset + len(indices)]  # batch order = group order
                    offset += len(indices)
                    coarse = torch.sigmoid(resize(rows, tuple(image.shape[-2:])))
                    groups.append(self._prepare_group(indices, image, coarse))
                crops = torch.cat([g.parts.crop for g in groups]) if len(groups) > 1 else groups[0].parts.crop
                refiner_image = crops.expand(-1, 3, -1, -1) * 255.0  # (N, 3, S, S), contiguous
                coords = torch.cat([g.coords for g in groups])
                labels = torch.cat([g.labels for g in groups])
                mask_input = torch.cat([g.parts.prompts.mask_logits for g in groups])
                has_mask = torch.full((len(order),), 1.0 if cfg.use_mask_prompt else 0.0)
            # 4. Refiner graphs on the whole batch
            with timer.stage("image_encoder"):
                embeddings = self.engine.run("image_encoder", {"image": refiner_image.numpy()})["image_embeddings"]
            with timer.stage("mask_decoder"):
                decoded = self._decode(embeddings, coords, labels, mask_input, has_mask)
            # 5. Paste back, gate, threshold — per group at its own size
            low = torch.from_numpy(decoded["low_res_masks"])
            iou = decoded["iou_predictions"].reshape(len(order), -1)[:, 0]
            with timer.stage("paste_back"):
                sams, offset = [], 0
                for g in groups:
                    rows = slice(offset, offset + len(g.indices))
                    offset += len(g.indices)
                    sams.append(paste_refiner_logits(low[rows, :1], g.parts.roi, tuple(g.image.shape[-2:]),
                                                     self.refiner_size))
            with timer.stage("gate"):
                gates = self._gates(groups, sams, gate_config, gate_graph)
            with timer.stage("postprocess"):
                results: list[SegmentResult | None] = [None] * len(arrays)
                offset = 0
                for g, sam, gate in zip(groups, sams, gates, strict=True):
                    refined = apply_gate(g.coarse, sam, gate)
                    group_iou = iou[offset : offset + len(g.indices)]
                    offset += len(g.indices)
                    group_spacings = [spacings[i] if spacings is not None else None for i in g.indices]
                    group_flat = [flat[i] for i in g.indices]
                    for i, result in zip(g.indices, self._group_results(
                            g, refined, gate, group_iou, threshold, options.outputs, group_spacings, group_flat),
                            strict=True):
                        results[i] = result
        timings = timer.total()
        for result in results:
            result.timings = dict(timings)
        return results  # type: ignore[return-value]

    def _coarse_passes(self, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """TransUNet probability (B, 1, S, S) of ``batch`` and, under the coarse_flip rule, of its mirror (else None).

        The mirrored copies ride in the originals' engine call (2B images) while 2B <= ``mirror_merge_batch``;
        beyond it each pass gets its own call.
        """
        if not self.segment_rules["coarse_flip"]:
            return self.engine.run("transunet", {"image": batch.numpy()})["probability"], None
        n = batch.shape[0]
        if 2 * n <= self.mirror_merge_batch:
            both = self.engine.run("transunet", {"image": torch.cat([batch, batch.flip(-1)]).numpy()})["probability"]
            return both[:n], both[n:]
        return (self.engine.run("transunet", {"image": batch.numpy()})["probability"],
                self.engine.run("transunet", {"image": batch.flip(-1).numpy()})["probability"])

    def _prepare_group(self, indices: list[int], image: torch.Tensor, coarse: torch.Tensor) -> _Group:
        """``models.ultrarefiner.roi_prompts`` for images of one size (the refiner's preprocessing is inside
        the image_encoder graph); prompts packed in the SAM ONNX point format."""
        cfg, s = self.config, self.refiner_size
        parts = roi_prompts(image, coarse, cfg, refiner_size=s, mask_prompt_size=self.mask_prompt_size)
        coords, labels = self._pack_prompts(
            parts.prompts.points if cfg.use_points else None,
            parts.prompts.point_labels if cfg.use_points else None,
            parts.prompts.box if cfg.use_box else None,
            batch=len(indices),
        )
        return _Group(indices=indices, image=image, coarse=coarse, parts=parts, coords=coords, labels=labels)

    @staticmethod
    def _pack_prompts(
        points: torch.Tensor | None, labels: torch.Tensor | None, box: torch.Tensor | None, *, batch: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """SAM ONNX point format: points (B, P, 2) with labels (B, P), then the box (B, 4) corners (labels 2, 3);
        without a box a padding point (label -1) is appended, as ``Sam.decode`` does.

        Returns:
            coords (B, N, 2) and labels (B, N), float32.
        """
        coords = [points] if points is not None else []
        codes = [labels] if labels is not None else []
        if box is not None:
            coords.append(box.reshape(batch, 2, 2))  # xyxy -> two corner points
            codes.append(torch.tensor([[2.0, 3.0]]).expand(batch, 2))
        else:
            coords.append(torch.full((batch, 1, 2), -0.5))  # +0.5 inside the decoder puts it at 0, like Sam's padding
            codes.append(torch.full((batch, 1), -1.0))
        return torch.cat(coords, dim=1).float(), torch.cat(codes, dim=1).float()

    def _decode(
        self,
        embeddings: np.ndarray,
        coords: torch.Tensor,
        labels: torch.Tensor,
        mask_input: torch.Tensor,
        has_mask: torch.Tensor,
    ) -> dict[str, np.ndarray]:
        s = float(self.refiner_size)
        return self.engine.run(
            "mask_decoder",
            {
                "image_embeddings": embeddings,
                "point_coords": coords.numpy(),
                "point_labels": labels.numpy(),
                "mask_input": mask_input.float().numpy(),
                "has_mask_input": has_mask.float().numpy(),
                "orig_im_size": np.array([s, s], dtype=np.float32),  # masks at the ROI frame; we use low_res_masks
            },
        )

    def _gates(
        self, groups: list[_Group], sams: list[torch.Tensor], config: GateConfig, use_graph: bool
    ) -> list[torch.Tensor]:
        """The gate of each group, (G, 1, H, W); the learned gate graph takes one size per call."""
        if not use_graph:
            gate = Gate(config)  # "none" / "uncertainty": no parameters
            return [gate(g.coarse, sam, g.image) for g, sam in zip(groups, sams, strict=True)]
        names = self.engine.input_names("gate")
        out = []
        for g, sam in zip(groups, sams, strict=True):
            feeds = {"coarse": g.coarse.numpy(), "sam": sam.numpy(), "image": g.image.numpy()}
            out.append(torch.from_numpy(self.engine.run("gate", {n: feeds[n] for n in names})["gate"]))
        return out

    def _group_results(
        self,
        g: _Group,
        refined: torch.Tensor,
        gate: torch.Tensor,
        iou: np.ndarray,
        threshold: float,
        outputs: tuple[str, ...],
        spacings: list[Sequence[float] | None],
        flat: list[bool],
    ) -> list[SegmentResult]:
        """One ``SegmentResult`` per image of group ``g`` (``refined``, ``gate``: (G, 1, H, W); ``iou``: (G,);
        ``flat``: per image, blank).

        The arrays are computed once for the group; each result holds its image's slice (contiguous).
        """
        probability = refined[:, 0].clamp_(0.0, 1.0).numpy()  # (G, H, W) float32
        coarse = g.coarse[:, 0].numpy()
        mask = np.greater(probability, threshold).view(np.uint8)  # {0, 1}: the bool's bytes, no copy
        gates = gate[:, 0].numpy()
        arrays = {
            "mask": mask,
            "probability": probability,
            "coarse_probability": coarse,
            "coarse_mask": np.greater(coarse, threshold).view(np.uint8) if "coarse_mask" in outputs else None,
            "gate": gates,
        }
        box = g.parts.image_box.numpy()
        points = g.parts.image_points.numpy()
        roi = g.parts.roi.numpy()
        results = []
        min_area = self.min_area_fraction * mask.shape[-1] * mask.shape[-2]
        for j, spacing in enumerate(spacings):
            if self.segment_rules["largest_component"]:
                mask[j] = keep_largest_component(mask[j])
            area = int(mask[j].sum())
            if 0 < area and (area < min_area or flat[j]):  # no finding: an empty mask
                mask[j] = 0
                area = 0
            results.append(SegmentResult(
                **{name: (arrays[name][j] if name in outputs else None) for name in OUTPUT_ARRAYS},
                box=box[j].astype(np.float32),
                points=points[j].astype(np.float32),
                point_labels=np.array([1.0, 0.0], dtype=np.float32),
                roi=roi[j].astype(np.float32),
                iou=float(iou[j]),
                uncertainty=float(gates[j].mean()),
                area_pixels=area,
                area_mm2=_area_mm2(area, spacing),
                threshold=threshold,
                timings={},
                model_version=self.artifacts.version,
                needs_review=bool(float(iou[j]) < self.review_threshold),
                lesion_found=area > 0,
            ))
        return results

    # ------------------------------------------------------------------ refine (interactive)
    def refine(
        self,
        image: np.ndarray,
        box: Sequence[float] | np.ndarray | None = None,
        points: Sequence[Sequence[float]] | np.ndarray | None = None,
        point_labels: Sequence[float] | np.ndarray | None = None,
        prior_mask: np.ndarray | None = None,
        image_key: str | None = None,
        *,
        threshold: float | None = None,
        spacing: Sequence[float] | None = None,
    ) -> RefineResult:
        """Refine with user prompts (MedSAM-style interactive use); see the module docstring for the framing.

        Args:
            image: (H, W) float32 in [0, 1].
            box: (4,) xyxy in the image pixel frame (0 <= x0 < x1 <= W, 0 <= y0 < y1 <= H), or None.
            points: (N, 2) xy in the image pixel frame, N <= ``max_points``, or None.
            point_labels: (N,) 1 foreground / 0 background; required with ``points``.
            prior_mask: (H, W) in [0, 1] (a previous mask or probability) used as SAM's mask prompt, or None.
            image_key: a content digest of the image the caller already has (e.g. sha256 of the uploaded
                file's bytes) for the embedding cache; None = sha256 of the decoded pixels. It must change
                whenever the pixels change.
            threshold: in (0, 1); None = the manifest's.
            spacing: (row, column) pixel spacing in mm for ``area_mm2``.

        Raises:
            InputError: bad image or threshold.
            PromptError: no prompt, a prompt outside the image, an inverted or empty box, too many points,
                labels that do not match the points, an all-zero / all-one prior mask.
        """
        image = self._check_image(image, "image")
        if threshold is not None:
            _check_number(threshold, "threshold", low=0.0, high=1.0, open_interval=True)
        return self._refine(image, box, points, point_labels, prior_mask, image_key, threshold, spacing,
                            use_cache=True)

    def _check_prompts(
        self, shape: tuple[int, int], box: Any, points: Any, point_labels: Any, prior_mask: Any
    ) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None, np.ndarray | None]:
        h, w = shape
        if box is None and points is None and prior_mask is None:
            raise PromptError("refine needs at least one prompt: box, points or prior_mask", "box")
        box_arr = None
        if box is not None:
            box_arr = np.asarray(box, dtype=np.float64).reshape(-1)
            if box_arr.shape != (4,) or not np.isfinite(box_arr).all():
                raise PromptError(f"box must be 4 finite numbers x0, y0, x1, y1, got {np.asarray(box).tolist()}", "box")
            x0, y0, x1, y1 = box_arr
            if x1 <= x0 or y1 <= y0:
                raise PromptError(f"box must have x0 < x1 and y0 < y1, got {box_arr.tolist()} (inverted or empty)",
                                  "box")
            if x0 < 0 or y0 < 0 or x1 > w or y1 > h:
                raise PromptError(f"box {box_arr.tolist()} lies outside the image (width {w}, height {h})", "box")
        pts = labels = None
        if points is not None or point_labels is not None:
            if points is None or point_labels is None:
                raise PromptError("points and point_labels must be given together", "points")
            pts = np.asarray(points, dtype=np.float64)
            if pts.ndim == 1 and pts.size == 2:
                pts = pts.reshape(1, 2)
            if pts.ndim != 2 or pts.shape[1] != 2 or len(pts) == 0 or not np.isfinite(pts).all():
                raise PromptError(f"points must be (N, 2) finite xy with N >= 1, got shape {pts.shape}", "points")
            if len(pts) > self.max_points:
                raise PromptError(f"too many points: {len(pts)} > max_points {self.max_points}", "points")
            labels = np.asarray(point_labels, dtype=np.float64).reshape(-1)
            if labels.shape != (len(pts),):
                raise PromptError(f"point_labels must have one label per point ({len(pts)}), got {labels.size}",
                                  "point_labels")
            if not np.isin(labels, (0.0, 1.0)).all():
                raise PromptError(f"point_labels must be 1 (foreground) or 0 (background), got {labels.tolist()}",
                                  "point_labels")
            outside = (pts[:, 0] < 0) | (pts[:, 0] > w) | (pts[:, 1] < 0) | (pts[:, 1] > h)
            if outside.any():
                raise PromptError(f"points {pts[outside].tolist()} lie outside the image (width {w}, height {h})",
                                  "points")
        prior = None
        if prior_mask is not None:
            prior = np.asarray(prior_mask)
            if prior.shape != (h, w):
                raise PromptError(f"prior_mask shape {prior.shape} does not match the image {(h, w)}", "prior_mask")
            prior = prior.astype(np.float32)
            if not np.isfinite(prior).all() or prior.min() < 0.0 or prior.max() > 1.0:
                raise PromptError("prior_mask values must be in [0, 1] (a mask or probability map)", "prior_mask")
            if prior.max() == 0.0 or prior.min() == 1.0:
                which = "all zero" if prior.max() == 0.0 else "all one"
                raise PromptError(f"prior_mask is {which}; it carries no shape to refine", "prior_mask")
        return box_arr, pts, labels, prior

    def _refine_window(self, box: np.ndarray | None, shape: tuple[int, int]) -> torch.Tensor:
        """The square window /refine encodes, (1, 4) xyxy continuous frame.

        With a box: the ROI ``segment`` would cut around a coarse mask with that box (the framing the refiner
        was trained in), snapped (``WINDOW_SIDE_STEP`` / ``WINDOW_CENTRE_STEP``) and kept inside the image
        where it fits. Without one (points / prior only): the whole image.
        """
        h, w = shape
        if box is None:
            return full_image_roi(1, (h, w))
        cfg = self.config
        roi = roi_from_box(torch.from_numpy(box).float()[None], (h, w), cfg.roi_expand_ratio, cfg.roi_min_fraction)
        x0, y0, x1, y1 = (float(v) for v in roi[0])
        side = min(float(max(h, w)), float(np.ceil((x1 - x0) / WINDOW_SIDE_STEP - 1e-6) * WINDOW_SIDE_STEP))
        half = side / 2.0
        centre = []
        for c, extent in (((x0 + x1) / 2.0, float(w)), ((y0 + y1) / 2.0, float(h))):
            c = float(np.round(c / WINDOW_CENTRE_STEP) * WINDOW_CENTRE_STEP)
            lo, hi = min(half, extent / 2.0), max(extent - half, extent / 2.0)
            centre.append(min(max(c, lo), hi))
        cx, cy = centre
        return torch.tensor([[cx - half, cy - half, cx + half, cy + half]], dtype=torch.float32)

    def _refine(
        self,
        image: np.ndarray,
        box: Any,
        points: Any,
        point_labels: Any,
        prior_mask: Any,
        image_key: str | None,
        threshold: float | None,
        spacing: Sequence[float] | None,
        *,
        use_cache: bool,
    ) -> RefineResult:
        # 1. Check prompts
        h, w = image.shape
        box_arr, pts, labels, prior = self._check_prompts((h, w), box, points, point_labels, prior_mask)
        threshold = float(threshold) if threshold is not None else self.threshold
        timer = _Timer()
        s, m = self.refiner_size, self.mask_prompt_size
        with torch.inference_mode():
            tensor = torch.from_numpy(image)[None, None]
            roi = self._refine_window(box_arr, (h, w))
            # 2. Image embedding: cached by (image digest, model version, size, crop window)
            with timer.stage("cache_lookup"):
                key_image = image_key if image_key is not None else pixels_digest(image)
                key = (key_image, self.artifacts.version, (h, w), tuple(round(float(v), 3) for v in roi[0]))
                embeddings = self.embedding_cache.get(key) if use_cache else None
            cache_hit = embeddings is not None
            if not cache_hit:
                with timer.stage("image_encoder"):
                    crop = crop_roi(tensor, roi, s)
                    refiner_image = (crop.expand(-1, 3, -1, -1) * 255.0).contiguous().numpy()
                    embeddings = self.engine.run("image_encoder", {"image": refiner_image})["image_embeddings"]
                if use_cache:
                    self.embedding_cache.put(key, embeddings)
            # 3. Prompts in the refiner frame, decoder
            with timer.stage("prompts"):
                pts_t = to_roi_frame(torch.from_numpy(pts).float()[None], roi, s) if pts is not None else None
                labels_t = torch.from_numpy(labels).float()[None] if labels is not None else None
                box_t = to_roi_frame(torch.from_numpy(box_arr).float()[None], roi, s) if box_arr is not None else None
                coords, codes = pack_tokens(pts_t, labels_t, box_t, batch=1)
                if box_arr is not None:
                    # The ROI-trained refiner always saw a mask prompt: a box gets its inscribed ellipse, averaged
                    # with the prior mask when there is one (validation phantoms, 120 cases: box 0.927 with the
                    # ellipse, 0.920 without; box + prior 0.931 averaged, 0.927 prior alone; /segment 0.923).
                    ellipse = box_ellipse(box_arr, (h, w))
                    prior = ellipse if prior is None else 0.5 * (prior + ellipse)
                if prior is not None:
                    mask_input = mask_prompt(crop_roi(torch.from_numpy(prior)[None, None], roi, m), None, "direct")
                    has_mask = torch.ones(1)
                else:
                    mask_input, has_mask = torch.zeros(1, 1, m, m), torch.zeros(1)
            with timer.stage("mask_decoder"):
                decoded = self._decode(embeddings, coords, codes, mask_input, has_mask)
            # 4. Back to the image frame
            with timer.stage("postprocess"):
                low = torch.from_numpy(decoded["low_res_masks"][:, :1])
                probability = paste_refiner_logits(low, roi, (h, w), s)[0, 0].numpy().astype(np.float32)
                mask = (probability > threshold).astype(np.uint8)
        area = int(mask.sum())
        iou = float(decoded["iou_predictions"].reshape(-1)[0])
        return RefineResult(
            mask=mask,
            probability=probability,
            iou=iou,
            needs_review=iou < self.review_threshold,
            lesion_found=area > 0,
            area_pixels=area,
            area_mm2=_area_mm2(area, spacing),
            threshold=threshold,
            cache_hit=cache_hit,
            image_key=key_image,
            timings=timer.total(),
            model_version=self.artifacts.version,
        )
