"""Export the generator of a GenSeg run (``python -m training genseg``) as a generator artifact: its pix2pix
graph, parity-checked, in the format ``python -m export generators`` writes, so /synthesize can serve it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from export.generators import pix2pix_spec
from export.onnx_export import DEFAULT_OPSET, export_specs, reverify_specs, staging_dir, write_artifact_manifest

__all__ = [
    "CONSISTENCY_MASKS",
    "CONSISTENCY_SEED",
    "GENSEG_SOURCE",
    "consistency_dice",
    "export_genseg_generator",
    "load_genseg_parts",
    "reverify_parity",
    "source_runs_usable",
]

GENSEG_SOURCE = "genseg"  # manifest source.kind of these artifacts (stage one's is "generators")
CONSISTENCY_MASKS = 32
CONSISTENCY_SEED = 71000  # held-out phantoms: no GenSeg training or tuning seed (docs/genseg.md)


def load_genseg_parts(run_dir: str | os.PathLike[str]) -> tuple[nn.Module, nn.Module, Any]:
    """``(generator, segmenter, run info)`` of a ``"genseg"`` run directory, both in eval mode on the CPU.

    Raises:
        weights.checkpoints.RunDirError: not a GenSeg run (names run.json and its kind), or unreadable weights.
    """
    from training.genseg import genseg_part
    from weights.checkpoints import RunDirError, load_run

    info = load_run(run_dir)
    if info.kind != "genseg":
        raise RunDirError(f"{Path(run_dir) / 'run.json'}: kind = {info.kind!r}; expected a 'genseg' run directory "
                          "(python -m training genseg)")
    return genseg_part(info, "generator"), genseg_part(info, "segmenter"), info


@torch.no_grad()
def consistency_dice(generator: nn.Module, segmenter: nn.Module, *, n: int = CONSISTENCY_MASKS,
                     seed: int = CONSISTENCY_SEED, threshold: float = 0.5) -> float:
    """Mean Dice of ``segmenter``'s mask on images ``generator`` makes from ``n`` held-out phantom masks
    against those masks (``training.generators.phantom_pairs(n, seed, S)``, S = the generator's size)."""
    from core.metrics import dice_per_case
    from training.generators import phantom_pairs

    size = int(generator.config.image_size)
    masks = torch.from_numpy(np.ascontiguousarray(phantom_pairs(n, seed, size).masks, dtype=np.float32))[:, None]
    images = generator(masks).clamp(0.0, 1.0)  # (n, 1, S, S) in [0, 1]
    predicted = torch.sigmoid(segmenter(images)) > threshold
    return float(dice_per_case(predicted[:, 0].numpy(), masks[:, 0].numpy() > 0.5).mean())


def _source(info: Any, consistency: float) -> dict[str, Any]:
    run_dir = str(Path(info.run_dir).resolve())
    return {"kind": GENSEG_SOURCE, "run_dir": run_dir, "weights_sha256": info.weights_sha256,
            "runs": {"genseg": {"run_dir": run_dir, "weights_sha256": info.weights_sha256}},
            "stage_one": info.sources.get("pix2pix"), "seed": info.seed,
            "consistency": {"dice": round(consistency, 6), "n_masks": CONSISTENCY_MASKS,
                            "phantom_seed": CONSISTENCY_SEED, "judge": "the run's own segmenter"}}


def export_genseg_generator(run_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
                            fp16: bool = False, opset: int = DEFAULT_OPSET, threads: int = 1,
                            log: Any = None) -> dict[str, Any]:
    """Export the generator of the GenSeg run ``run_dir`` into ``out_dir``; returns the manifest.

    The manifest is the stage-one format (``pipeline.kind = "generators"`` with a ``pix2pix`` block, so
    ``inference.generator_artifacts.load_generators`` serves it) with ``source.kind = "genseg"``, the run,
    its weights' sha256 and the consistency Dice (:func:`consistency_dice`).

    Raises:
        weights.checkpoints.RunDirError: not a GenSeg run, or unreadable weights.
        export.parity.ParityError: the graph failed parity (nothing is written, ``out_dir`` is untouched).
    """
    # 1. The run's generator and segmenter, and how well the one reads the other's images
    generator, segmenter, info = load_genseg_parts(run_dir)
    consistency = consistency_dice(generator, segmenter)
    # 2. Export + parity of the pix2pix graph and the manifest, in a staging directory
    with staging_dir(Path(out_dir)) as stage:
        graphs = export_specs([pix2pix_spec(generator)], stage, fp16=fp16, opset=opset, threads=threads, log=log)
        manifest = write_artifact_manifest(
            stage, graphs, pipeline={"kind": "generators", "pix2pix": {"config": generator.config.to_dict()}},
            source=_source(info, consistency), opset=opset, fp16=fp16)
    return manifest


def source_runs_usable(manifest: Mapping[str, Any]) -> tuple[bool, str]:
    """Whether the GenSeg run still exists with the exported weights (then parity can be re-run)."""
    from export.generators import source_runs_usable as runs_usable

    return runs_usable(manifest)


def reverify_parity(art_dir: str | os.PathLike[str], manifest: Mapping[str, Any], *,
                    threads: int = 1) -> dict[str, dict[str, Any]]:
    """Re-run the pix2pix graph's parity against the GenSeg run's generator (the manifest's bound).

    Raises:
        export.parity.ParityError: names the graph file on failure.
    """
    run_dir = manifest["source"]["run_dir"]
    generator, _, _ = load_genseg_parts(run_dir)
    return reverify_specs(art_dir, manifest, {"pix2pix": pix2pix_spec(generator)}, threads=threads,
                          source=f"the GenSeg run {run_dir}")
