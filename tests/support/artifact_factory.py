"""Tiny run directories and exported artifact directories for service tests.

``make_tiny_artifacts(tmp_dir)`` returns a ``TinyArtifacts(run_dir, art_dir)``: it exports the
committed default run (checkpoints/default) when it exists, else a seeded random UltraRefiner small
enough to export in seconds. A fresh TransUNet head sits at ~0.4 everywhere, which would make every
mask empty and every ROI the whole image; so the random model's head is calibrated on phantoms: its
logits get a standard deviation of 3 and a bias putting ~15 % of the pixels above 0.5 (image-dependent,
irregular foreground with many boundary pixels: a sharp test of mask parity). The learned gate's
zero-initialised output layer is randomised so that the gate varies over the image.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from training.phases import RUN_PRESETS
from weights.checkpoints import DEFAULT_RUN_DIR, save_run


def tiny_refiner(**changes: object) -> dict:
    """A copy of the ``tiny`` run preset's SAM refiner config (``training.phases``) with ``changes``."""
    return {**RUN_PRESETS["tiny"].model["refiner"], **changes}


TINY_CONFIG = {
    "transunet": "tiny",
    # windowed attention and 128 px: the exported graphs' windowing and resize paths are exercised
    "refiner": tiny_refiner(img_size=128, encoder_depth=2, encoder_global_attn_indexes=[1], window_size=4,
                            preprocess="sam"),
    "gate": {"type": "learned", "gate_gamma": 1.0, "gate_min": 0.0, "gate_max": 0.8, "hidden_channels": 4,
             "use_image": True},
    "ultrarefiner": {"use_roi": True, "roi_expand_ratio": 0.2},
}


@dataclass(frozen=True)
class TinyArtifacts:
    run_dir: Path
    art_dir: Path
    from_default_checkpoint: bool


def make_tiny_run(run_dir: Path, *, seed: int = 0, gate: dict | None = None) -> Path:
    """Save a seeded random UltraRefiner of ``TINY_CONFIG`` (optionally another gate) as a run directory."""
    from models.build import build_ultrarefiner, config_to_dict

    config = dict(TINY_CONFIG)
    if gate is not None:
        config["gate"] = gate
    config = config_to_dict(config)
    torch.manual_seed(seed)
    model = build_ultrarefiner(config).eval()
    head = model.transunet.segmentation_head[0]
    size = model.transunet.config.img_size
    calibration = torch.from_numpy(np.stack(phantom_images([(size, size)] * 4, seed=seed + 50))[:, None])
    with torch.no_grad():
        logits = model.transunet(calibration.expand(-1, model.transunet.config.in_channels, -1, -1)) - head.bias
        scale = 3.0 / logits.std()
        head.weight.mul_(scale)
        head.bias.fill_(-float(torch.quantile((logits * scale).flatten(), 0.85)))
        if hasattr(model.gate, "net"):
            torch.nn.init.normal_(model.gate.net[-1].weight, std=2.0)
    return save_run(run_dir, model, config, 0.5, {"val_dice": 0.0}, kind="ultrarefiner", phase="random", seed=seed)


def make_tiny_artifacts(tmp_dir: str | Path, *, use_default_checkpoint: bool = True) -> TinyArtifacts:
    """Export a run into ``tmp_dir/artifacts`` (the default checkpoint if present, else a tiny random run)."""
    from export.onnx_export import export_artifacts

    tmp_dir = Path(tmp_dir)
    from_default = use_default_checkpoint and (DEFAULT_RUN_DIR / "run.json").is_file()
    run_dir = DEFAULT_RUN_DIR if from_default else make_tiny_run(tmp_dir / "run")
    art_dir = tmp_dir / "artifacts"
    export_artifacts(run_dir, art_dir)
    return TinyArtifacts(run_dir=Path(run_dir), art_dir=art_dir, from_default_checkpoint=from_default)


def shared_tiny_artifacts(tmp_path_factory) -> Path:
    """Tiny exported artifacts (random tiny model), exported once per test session and shared by the OIP
    HTTP and gRPC test modules: the artifacts directory."""
    root = tmp_path_factory.getbasetemp() / "oip_tiny_artifacts"
    art_dir = root / "artifacts"
    if not (art_dir / "manifest.json").is_file():
        art_dir = make_tiny_artifacts(root, use_default_checkpoint=False).art_dir
    return art_dir


def phantom_images(sizes: list[tuple[int, int]], seed: int = 0) -> list[np.ndarray]:
    """Breast-ultrasound phantoms cropped to each (H, W): float32 (H, W) in [0, 1]."""
    from core.phantoms import breast_ultrasound

    images = []
    for index, (h, w) in enumerate(sizes):
        image, _ = breast_ultrasound(seed + index, size=max(h, w, 32))
        images.append((image[:h, :w].astype(np.float32) / 255.0).copy())
    return images


def session_tiny_artifacts(tmp_path_factory, *, use_default_checkpoint: bool = False) -> TinyArtifacts:
    """``make_tiny_artifacts`` once per pytest session (cached under the session's base temp dir), so
    several test modules share one export. Defaults to the tiny random run: deterministic and fast."""
    import json

    name = "tiny_artifacts_default" if use_default_checkpoint else "tiny_artifacts_random"
    root = tmp_path_factory.getbasetemp() / name
    manifest = root / "artifacts" / "manifest.json"
    if manifest.is_file():
        source = json.loads(manifest.read_text())["source"]["run_dir"]
        return TinyArtifacts(run_dir=Path(source), art_dir=manifest.parent,
                             from_default_checkpoint=Path(source).resolve() == DEFAULT_RUN_DIR.resolve())
    return make_tiny_artifacts(root, use_default_checkpoint=use_default_checkpoint)
