"""Parity specs, one per served graph (the wrappers are ``weights.graphs``; graphs, shapes and bounds:
docs/architecture.md, "export").
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from export.parity import BOUNDS, ParityCase
from weights.graphs import GateGraph, ImageEncoderGraph, TransUNetGraph, gate_input_names, model_parts

PARITY_SEED = 1234


# --------------------------------------------------------------------------- specs
@dataclass
class GraphSpec:
    """Everything needed to export one graph and decide whether the export is valid."""

    name: str
    module: nn.Module
    example: dict[str, torch.Tensor]
    output_names: tuple[str, ...]
    dynamic_axes: dict[str, dict[int, str]]
    reference: Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]
    cases: Callable[[], list[ParityCase]]
    mask_outputs: dict[str, float] = field(default_factory=dict)
    bounds: dict[str, float] = field(default_factory=dict)
    mask_fn: Callable[[Mapping[str, np.ndarray], Mapping[str, np.ndarray]], dict[str, np.ndarray]] | None = None

    def bound(self, precision: str) -> float:
        return self.bounds[precision]


def _torch_reference(fn: Callable[..., Any], input_names: tuple[str, ...], output_names: tuple[str, ...]
                     ) -> Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]:
    """Wrap a torch function of named tensors into numpy in / numpy out."""

    def reference(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            out = fn(*(torch.from_numpy(np.asarray(inputs[n])) for n in input_names))
        out = out if isinstance(out, tuple) else (out,)
        return {n: o.detach().cpu().numpy() for n, o in zip(output_names, out, strict=True)}

    return reference


def _example_generator() -> torch.Generator:
    """Seeded generator for the tracing examples (the exported bytes do not depend on them, but keep it exact)."""
    return torch.Generator().manual_seed(0)


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy().astype(np.float32)


def phantom_batch(batch: int, size: int, seed: int = PARITY_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` synthetic phantoms at ``size`` x ``size`` (core.phantoms; breast ultrasound and chest X-ray
    alternating): images (B, 1, S, S) float32 in [0, 1], masks (B, 1, S, S) float32 in {0, 1}."""
    from core.phantoms import breast_ultrasound, chest_xray

    pairs = [(breast_ultrasound if i % 2 == 0 else chest_xray)(seed + i, size) for i in range(batch)]
    images = np.stack([p[0] for p in pairs])[:, None].astype(np.float32) / 255.0
    masks = np.stack([p[1] for p in pairs])[:, None].astype(np.float32)
    return torch.from_numpy(images), torch.from_numpy(masks)


def transunet_spec(transunet: nn.Module) -> GraphSpec:
    cfg = transunet.config
    size, channels = cfg.img_size, cfg.in_channels
    module = TransUNetGraph(transunet).eval()

    def cases() -> list[ParityCase]:
        gen = torch.Generator().manual_seed(PARITY_SEED)
        images, _ = phantom_batch(2, size)
        return [ParityCase("phantom", {"image": _np(images.repeat(1, channels, 1, 1))}),
                ParityCase("random", {"image": _np(torch.rand(1, channels, size, size, generator=gen))})]

    return GraphSpec(
        name="transunet", module=module,
        example={"image": torch.rand(2, channels, size, size, generator=_example_generator())},
        output_names=("probability",),
        dynamic_axes={"image": {0: "batch"}, "probability": {0: "batch"}},
        reference=_torch_reference(lambda x: torch.sigmoid(transunet(x)), ("image",), ("probability",)),
        cases=cases, mask_outputs={"probability": 0.5}, bounds=dict(BOUNDS["transunet"]),
    )


def _rgb255(gray: torch.Tensor) -> torch.Tensor:
    """(B, 1, R, R) in [0, 1] -> (B, 3, R, R) in [0, 255]: the refiner's input convention."""
    return gray.repeat(1, 3, 1, 1) * 255.0


def image_encoder_spec(sam: nn.Module) -> GraphSpec:
    size = sam.img_size
    module = ImageEncoderGraph(sam).eval()

    def cases() -> list[ParityCase]:
        gen = torch.Generator().manual_seed(PARITY_SEED + 1)
        images, _ = phantom_batch(1, size, seed=PARITY_SEED + 1)
        return [ParityCase("phantom", {"image": _np(_rgb255(images))}),
                ParityCase("random", {"image": _np(torch.rand(2, 3, size, size, generator=gen) * 255.0)})]

    return GraphSpec(
        name="image_encoder", module=module,
        example={"image": torch.rand(2, 3, size, size, generator=_example_generator()) * 255.0},
        output_names=("image_embeddings",),
        dynamic_axes={"image": {0: "batch"}, "image_embeddings": {0: "batch"}},
        reference=_torch_reference(lambda x: sam.encode(sam.preprocess(x)), ("image",), ("image_embeddings",)),
        cases=cases, bounds=dict(BOUNDS["image_encoder"]),
    )


def _phantom_prompts(sam: nn.Module, masks: torch.Tensor) -> dict[str, torch.Tensor]:
    """Decoder prompts from phantom masks (B, 1, R, R), the way the pipeline builds them:
    [positive, negative] points + box corners (labels 1, 0, 2, 3), mask logits at 4h x 4w."""
    from models.prompts import extract_prompts

    prompts = extract_prompts(masks)
    corners = prompts.box.view(-1, 2, 2)
    coords = torch.cat([prompts.points, corners], dim=1)
    labels = torch.cat([prompts.point_labels, torch.tensor([[2.0, 3.0]]).expand(masks.shape[0], 2)], dim=1)
    low = sam.prompt_encoder.mask_input_size
    mask_input = F.interpolate(prompts.mask_logits, size=tuple(low), mode="bilinear", align_corners=False)
    return {"point_coords": coords, "point_labels": labels, "mask_input": mask_input}


def mask_decoder_spec(sam: nn.Module) -> GraphSpec:
    from weights.sam_onnx import DYNAMIC_AXES, INPUT_NAMES, OUTPUT_NAMES, SamOnnxDecoder

    size = sam.img_size
    dim = sam.config.prompt_embed_dim
    grid = sam.config.embedding_size
    low = tuple(sam.prompt_encoder.mask_input_size)
    module = SamOnnxDecoder(sam, return_single_mask=True).eval()

    def random_inputs(batch: int, points: int, gen: torch.Generator, orig: tuple[float, float]) -> dict:
        labels = torch.randint(-1, 2, (batch, points), generator=gen).float()
        labels[:, 0] = 1.0
        return {
            "image_embeddings": torch.randn(batch, dim, grid, grid, generator=gen),
            "point_coords": torch.rand(batch, points, 2, generator=gen) * size,
            "point_labels": labels,
            "mask_input": torch.randn(batch, 1, *low, generator=gen) * 5.0,
            "has_mask_input": (torch.arange(batch) % 2 == 0).float(),
            "orig_im_size": torch.tensor(orig, dtype=torch.float32),
        }

    def cases() -> list[ParityCase]:
        gen = torch.Generator().manual_seed(PARITY_SEED + 2)
        images, masks = phantom_batch(1, size, seed=PARITY_SEED + 2)
        with torch.no_grad():
            embeddings = sam.encode(sam.preprocess(_rgb255(images)))
        phantom = {"image_embeddings": embeddings, **_phantom_prompts(sam, masks),
                   "has_mask_input": torch.ones(1), "orig_im_size": torch.tensor([size, size], dtype=torch.float32)}
        return [ParityCase("phantom", {k: _np(v) for k, v in phantom.items()}),
                ParityCase("random", {k: _np(v) for k, v in random_inputs(3, 5, gen, (300.0, 400.0)).items()})]

    example = random_inputs(2, 4, _example_generator(), (float(size), float(size)))
    return GraphSpec(
        name="mask_decoder", module=module,
        example={n: example[n] for n in INPUT_NAMES},
        output_names=tuple(OUTPUT_NAMES),
        dynamic_axes={k: dict(v) for k, v in DYNAMIC_AXES.items()},
        reference=_torch_reference(module, tuple(INPUT_NAMES), tuple(OUTPUT_NAMES)),
        cases=cases, mask_outputs={"masks": 0.0, "low_res_masks": 0.0}, bounds=dict(BOUNDS["mask_decoder"]),
    )


def gate_spec(gate: nn.Module, size: int, threshold: float = 0.5) -> GraphSpec:
    """The gate's binary check is on what it decides: the refined mask
    ``coarse + gate * (sam - coarse) > threshold`` (models.gate.apply_gate)."""
    from models.gate import apply_gate

    names = gate_input_names(gate)
    module = GateGraph(gate).eval()
    spatial = {0: "batch", 2: "height", 3: "width"}

    def refined_mask(inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        coarse, sam, weight = (torch.from_numpy(np.asarray(a)) for a in (inputs["coarse"], inputs["sam"],
                                                                          outputs["gate"]))
        return {"refined": apply_gate(coarse, sam, weight.to(coarse.dtype)).numpy() > threshold}

    def cases() -> list[ParityCase]:
        gen = torch.Generator().manual_seed(PARITY_SEED + 3)
        images, masks = phantom_batch(2, size, seed=PARITY_SEED + 3)
        coarse = (masks * 0.8 + 0.1 + 0.1 * torch.rand(masks.shape, generator=gen)).clamp(0, 1)
        sam = (masks * 0.9 + 0.05 * torch.rand(masks.shape, generator=gen)).clamp(0, 1)
        phantom = {"coarse": coarse, "sam": sam, "image": images}
        random = {n: torch.rand(3, 1, size // 2, size, generator=gen) for n in names}
        return [ParityCase("phantom", {n: _np(phantom[n]) for n in names}),
                ParityCase("random", {n: _np(random[n]) for n in names})]

    return GraphSpec(
        name="gate", module=module,
        example={n: torch.rand(2, 1, size, size, generator=_example_generator()) for n in names},
        output_names=("gate",),
        dynamic_axes={n: dict(spatial) for n in (*names, "gate")},
        reference=_torch_reference(lambda *x: gate(*x), names, ("gate",)),
        cases=cases, bounds=dict(BOUNDS["gate"]), mask_fn=refined_mask,
    )


# --------------------------------------------------------------------------- from a run
def build_graph_specs(model: nn.Module, info: Any) -> list[GraphSpec]:
    """Specs of every graph the service needs for this run's model (eval mode, CPU)."""
    transunet, sam, gate = model_parts(model)
    specs = []
    if transunet is not None:
        specs.append(transunet_spec(transunet))
    if sam is not None:
        specs += [image_encoder_spec(sam), mask_decoder_spec(sam)]
    if gate is not None and gate.config.type in ("learned", "hybrid"):
        size = transunet.config.img_size if transunet is not None else sam.img_size
        specs.append(gate_spec(gate, size, float(info.threshold)))
    return specs


def pipeline_block(model: nn.Module, info: Any) -> dict[str, Any]:
    """The manifest's ``pipeline`` block: every setting the service's glue needs, taken from the model."""
    transunet, sam, gate = model_parts(model)
    block: dict[str, Any] = {"threshold": float(info.threshold)}
    if transunet is not None:
        block.update(transunet_size=int(transunet.config.img_size),
                     transunet_in_channels=int(transunet.config.in_channels))
    if sam is not None:
        cfg = sam.config
        ur = model.config.to_dict()  # sam is not None: an UltraRefiner
        block.update(refiner_size=int(cfg.img_size), refiner_preprocess=cfg.preprocess,
                     pixel_mean=list(cfg.pixel_mean), pixel_std=list(cfg.pixel_std),
                     gate=gate.config.to_dict() if gate is not None else None, ultrarefiner=ur)
        for key in ("roi_expand_ratio", "mask_prompt_style", "use_points", "use_box", "use_mask_prompt"):
            if key in ur:
                block[key] = ur[key]
    # Validation choices behind an answer's lesion_found / needs_review (training.calibration), when trained.
    for key in ("no_finding", "review", "segment"):
        if isinstance(info.raw.get(key), dict):
            block[key] = info.raw[key]
    return block


# Whole-model configs for `python -m export onnx --random-config NAME` (run.json "config" parts by preset).
RANDOM_CONFIGS: dict[str, dict[str, str]] = {
    "paper": {"transunet": "r50-vit-b16", "refiner": "vit_b", "gate": "default", "ultrarefiner": "default"},
    "default": {"transunet": "default", "refiner": "default", "gate": "default", "ultrarefiner": "default"},
    "tiny": {"transunet": "default", "refiner": "tiny", "gate": "learned", "ultrarefiner": "default"},
}


def save_random_run(name: str, run_dir: str | os.PathLike[str], *, seed: int = 0) -> Path:
    """Build an UltraRefiner from ``RANDOM_CONFIGS[name]`` with seeded random weights; save it as a run dir.

    Raises:
        ValueError: unknown name (the known ones are listed).
    """
    from models.build import build_ultrarefiner, config_to_dict
    from weights.checkpoints import save_run

    if name not in RANDOM_CONFIGS:
        raise ValueError(f"unknown random config {name!r}; expected one of {sorted(RANDOM_CONFIGS)}")
    config = config_to_dict(RANDOM_CONFIGS[name])
    torch.manual_seed(seed)
    model = build_ultrarefiner(config)
    return save_run(run_dir, model, config, 0.5, {}, kind="ultrarefiner", phase="random", seed=seed)
