"""Export the generator runs (``checkpoints/generators/{text2image,pix2pix,selector}``, plus ``reward`` after
``training rlhf``) to parity-checked ONNX
(graphs, bounds and the tokenizer asset: docs/architecture.md, "export").
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from export.graphs import PARITY_SEED, GraphSpec, _example_generator, _np, _torch_reference, phantom_batch
from export.onnx_export import (
    DEFAULT_OPSET,
    export_specs,
    reverify_specs,
    staging_dir,
    write_artifact_manifest,
)
from export.parity import BOUNDS, ParityCase

GENERATOR_RUNS = ("text2image", "pix2pix", "selector", "reward")
# The latent decoder's output is an image in [0, 1], bounded like pix2pix's.
VAE_DECODER_BOUNDS = {"fp32": 1e-4, "fp16": 1e-2}
TOKENIZER_ASSET = "tokenizer/tokenizer.json"
BATCH = {0: "batch"}

# Realistic prompts for the text encoder's and the denoiser's parity cases (punctuation, case, empty).
PARITY_PROMPTS = (
    "chest x-ray, left lower lobe nodule",
    "Brain MRI (T2-weighted): no acute findings!",
    "",
    "OCT of the retina with drusen; fundus normal",
)


# --------------------------------------------------------------------------- wrappers
class TextEncoderGraph(nn.Module):
    """``input_ids``, ``attention_mask`` (B, T) int64 -> ``text_hidden`` (B, T, D): a Hugging Face encoder's
    ``last_hidden_state`` with every token type 0 (single-sentence prompts, as core.text_encoders feeds it)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                            token_type_ids=torch.zeros_like(input_ids)).last_hidden_state


class ScorerGraph(nn.Module):
    """``image`` (B, 1, S, S) in [0, 1], ``modality_ids`` (B,) int64 -> (B,) ``scorer.score``: the best-of-N
    score of a ``Selector`` or a ``RewardModel`` (the predicted rating)."""

    def __init__(self, scorer: nn.Module) -> None:
        super().__init__()
        self.scorer = scorer

    def forward(self, image: torch.Tensor, modality_ids: torch.Tensor) -> torch.Tensor:
        return self.scorer.score(image, modality_ids)


# --------------------------------------------------------------------------- specs
def pix2pix_spec(generator: nn.Module) -> GraphSpec:
    """The mask-to-image generator at its trained size; no binary check (its output is an image)."""
    size = generator.config.image_size

    def cases() -> list[ParityCase]:
        gen = torch.Generator().manual_seed(PARITY_SEED + 10)
        _, masks = phantom_batch(2, size, seed=PARITY_SEED + 10)
        # blocky random masks, and an empty one
        blocks = (torch.rand(3, 1, size // 8, size // 8, generator=gen) > 0.5).float()
        random = torch.nn.functional.interpolate(blocks, scale_factor=8, mode="nearest")
        random[2] = 0.0
        return [ParityCase("phantom", {"mask": _np(masks)}), ParityCase("random", {"mask": _np(random)})]

    example = (torch.rand(2, 1, size, size, generator=_example_generator()) > 0.5).float()
    return GraphSpec(
        name="pix2pix", module=generator.eval(), example={"mask": example}, output_names=("image",),
        dynamic_axes={"mask": dict(BATCH), "image": dict(BATCH)},
        reference=_torch_reference(generator, ("mask",), ("image",)),
        cases=cases, bounds=dict(BOUNDS["pix2pix"]),
    )


def _tokenize(encoder: Any, prompts: list[str]) -> dict[str, torch.Tensor]:
    """The ids and mask core.text_encoders.HFTextEncoder feeds its model: padded to ``max_tokens``."""
    batch = encoder.tokenizer(list(prompts), padding="max_length", max_length=encoder.max_tokens,
                              truncation=True, return_tensors="pt")
    return {"input_ids": batch["input_ids"].long(), "attention_mask": batch["attention_mask"].long()}


def text_encoder_spec(encoder: Any) -> GraphSpec:
    """The frozen encoder of a ``core.text_encoders.HFTextEncoder`` (its ``model`` and ``tokenizer``).

    The reference is the Hugging Face model called without token types (its own default), so a wrapper
    that fed other token types would fail parity.
    """
    model, steps = encoder.model.eval(), int(encoder.max_tokens)
    vocab = int(model.config.vocab_size)

    def cases() -> list[ParityCase]:
        gen = torch.Generator().manual_seed(PARITY_SEED + 11)
        lengths = torch.tensor([steps, 2, 1 + int(torch.randint(2, steps, (1,), generator=gen))])
        ids = torch.randint(1000, vocab, (3, steps), generator=gen)
        mask = (torch.arange(steps)[None, :] < lengths[:, None]).long()
        random = {"input_ids": ids * mask, "attention_mask": mask}
        prompts = _tokenize(encoder, list(PARITY_PROMPTS))
        return [ParityCase("prompts", {k: v.numpy() for k, v in prompts.items()}),
                ParityCase("random", {k: v.numpy() for k, v in random.items()})]

    def reference(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    # padded examples: a trace without padding could drop the attention mask
    example = _tokenize(encoder, list(PARITY_PROMPTS[:2]))
    return GraphSpec(
        name="text_encoder", module=TextEncoderGraph(model).eval(), example=example,
        output_names=("text_hidden",),
        dynamic_axes={"input_ids": dict(BATCH), "attention_mask": dict(BATCH), "text_hidden": dict(BATCH)},
        reference=_torch_reference(reference, ("input_ids", "attention_mask"), ("text_hidden",)),
        cases=cases, bounds=dict(BOUNDS["text_encoder"]),
    )


DENOISER_INPUTS = ("noisy", "timestep", "text_hidden", "text_mask", "modality_ids")


def denoiser_spec(model: nn.Module, encoder: Any) -> GraphSpec:
    """``Text2ImageModel.forward``; the phantom case noises core.phantoms images with the training
    schedule and conditions them on encoded prompts (``encoder``), the random case is Gaussian."""
    from models.text2image import build_train_scheduler

    cfg = model.config
    shape, steps, dim, nulls = cfg.sample_shape, cfg.max_text_tokens, cfg.text_dim, cfg.null_modality

    def random_inputs(batch: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
        lengths = torch.randint(1, steps + 1, (batch,), generator=gen)
        return {
            "noisy": torch.randn(batch, *shape, generator=gen),
            "timestep": torch.randint(0, cfg.num_train_timesteps, (batch,), generator=gen),
            "text_hidden": torch.randn(batch, steps, dim, generator=gen),
            "text_mask": (torch.arange(steps)[None, :] < lengths[:, None]).float(),
            "modality_ids": torch.randint(0, nulls + 1, (batch,), generator=gen),
        }

    def cases() -> list[ParityCase]:
        gen = torch.Generator().manual_seed(PARITY_SEED + 12)
        images, _ = phantom_batch(2, cfg.image_size, seed=PARITY_SEED + 12)
        timestep = torch.tensor([100, 700])
        with torch.no_grad():
            x0 = model.encode(images)  # pixels 2 x - 1, or latents
        noisy = build_train_scheduler(cfg).add_noise(x0, torch.randn(x0.shape, generator=gen), timestep)
        hidden, mask = encoder.encode(["breast ultrasound, hypoechoic lesion", "chest x-ray, clear lungs"])
        phantom = {"noisy": noisy, "timestep": timestep, "text_hidden": hidden, "text_mask": mask.float(),
                   "modality_ids": torch.tensor([nulls, cfg.modalities.index("chest_xray")
                                                 if "chest_xray" in cfg.modalities else 0])}
        return [ParityCase("phantom", {k: _np(v) if v.is_floating_point() else v.numpy() for k, v in phantom.items()}),
                ParityCase("random", {k: _np(v) if v.is_floating_point() else v.numpy()
                                      for k, v in random_inputs(3, gen).items()})]

    example = random_inputs(2, _example_generator())
    example["text_mask"][:, -1] = 0.0  # padded, like real prompts
    return GraphSpec(
        name="denoiser", module=model.eval(), example=example, output_names=("prediction",),
        dynamic_axes={**{n: dict(BATCH) for n in DENOISER_INPUTS}, "prediction": dict(BATCH)},
        reference=_torch_reference(model, DENOISER_INPUTS, ("prediction",)),
        cases=cases, bounds=dict(BOUNDS["denoiser"]),
    )


def vae_decoder_spec(model: nn.Module) -> GraphSpec:
    """A latent text2image model's decoder: ``latents (B, C, h, w)`` (scaled) -> ``image (B, 1, S, S)`` in
    [0, 1]; cases: latents of phantoms (the autoencoder's encoder) and Gaussian latents (what sampling starts
    from)."""
    autoencoder = model.autoencoder.eval()
    shape = model.config.sample_shape

    def cases() -> list[ParityCase]:
        gen = torch.Generator().manual_seed(PARITY_SEED + 14)
        images, _ = phantom_batch(2, model.config.image_size, seed=PARITY_SEED + 14)
        with torch.no_grad():
            latents = autoencoder.encode(images)
        return [ParityCase("phantom", {"latents": _np(latents)}),
                ParityCase("random", {"latents": _np(torch.randn(3, *shape, generator=gen))})]

    example = {"latents": torch.randn(2, *shape, generator=_example_generator())}
    return GraphSpec(
        name="vae_decoder", module=autoencoder, example=example, output_names=("image",),
        dynamic_axes={"latents": dict(BATCH), "image": dict(BATCH)},
        reference=_torch_reference(autoencoder.decode, ("latents",), ("image",)),
        cases=cases, bounds=dict(VAE_DECODER_BOUNDS),
    )


def _scorer_spec(name: str, scorer: nn.Module, output: str, seed: int) -> GraphSpec:
    """A best-of-N scorer (``score(image, modality_ids) -> (B,)``, higher is better) at its selector's size.
    Binary check: best-of-N picks the same candidate (a one-hot of the arg-max over each case's batch)."""
    size, classes = scorer.config.image_size, len(scorer.config.modalities)

    def best_pick(_inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        score = np.asarray(outputs[output])
        return {"best": np.arange(score.shape[0]) == int(np.argmax(score))}

    def cases() -> list[ParityCase]:
        gen = torch.Generator().manual_seed(PARITY_SEED + seed)
        images, _ = phantom_batch(4, size, seed=PARITY_SEED + seed)
        noisy = (images + 0.2 * torch.randn(images.shape, generator=gen)).clamp(0.0, 1.0)
        phantom = torch.cat([images, noisy])
        ids = torch.randint(0, classes, (phantom.shape[0],), generator=gen)
        random = torch.rand(3, 1, size, size, generator=gen)
        return [ParityCase("phantom", {"image": _np(phantom), "modality_ids": ids.numpy()}),
                ParityCase("random", {"image": _np(random),
                                      "modality_ids": torch.randint(0, classes, (3,), generator=gen).numpy()})]

    gen = _example_generator()
    example = {"image": torch.rand(2, 1, size, size, generator=gen),
               "modality_ids": torch.randint(0, classes, (2,), generator=gen)}
    return GraphSpec(
        name=name, module=ScorerGraph(scorer).eval(), example=example, output_names=(output,),
        dynamic_axes={"image": dict(BATCH), "modality_ids": dict(BATCH), output: dict(BATCH)},
        reference=_torch_reference(scorer.score, ("image", "modality_ids"), (output,)),
        cases=cases, bounds=dict(BOUNDS[name]), mask_fn=best_pick,
    )


def selector_spec(selector: nn.Module) -> GraphSpec:
    """``Selector.score`` (``log p(modality) + log p(real)``) at the selector's size."""
    return _scorer_spec("selector", selector, "score", seed=13)


def reward_spec(reward: nn.Module) -> GraphSpec:
    """``RewardModel.score`` (the predicted 1-5 rating) at its selector's size."""
    return _scorer_spec("reward", reward, "rating", seed=15)


# --------------------------------------------------------------------------- from the generator runs
@dataclass
class GeneratorSources:
    """The loaded generator runs of one directory (eval mode, CPU); absent runs are None.

    ``runs`` maps each present run's name to ``{"run_dir", "weights_sha256"}`` (the manifest's
    ``source.runs``); ``text_encoder`` is the ``core.text_encoders.HFTextEncoder`` of the text2image run.
    """

    root: Path
    runs: dict[str, dict[str, str]] = field(default_factory=dict)
    text2image: nn.Module | None = None
    text2image_config: dict[str, Any] = field(default_factory=dict)
    text_encoder: Any = None
    pix2pix: nn.Module | None = None
    selector: nn.Module | None = None
    reward: nn.Module | None = None

    @property
    def text_encoder_name(self) -> str:
        from core.text_encoders import DEFAULT_TEXT_ENCODER

        return str(self.text2image_config.get("text_encoder", {}).get("name", DEFAULT_TEXT_ENCODER))


def _weights_sha256(run_dir: Path) -> str:
    from weights.checkpoints import WEIGHTS_FILE, file_sha256, read_run_json

    return file_sha256(run_dir / str(read_run_json(run_dir).get("weights", WEIGHTS_FILE)))


def load_generator_sources(generators_dir: str | os.PathLike[str]) -> GeneratorSources:
    """Load every generator run present under ``generators_dir`` (``"default"``: checkpoints/generators).

    Raises:
        weights.checkpoints.RunDirError: the directory does not exist or holds none of the runs
            (``text2image``, ``pix2pix``, ``selector``), or a run is inconsistent (names the file).
        core.text_encoders.TextEncoderError: the text2image run's text encoder cannot be loaded.
    """
    from core.text_encoders import HFTextEncoder
    from weights.checkpoints import RunDirError
    from weights.generators import load_pix2pix, load_selector, load_text2image, resolve_generators_dir
    from weights.reward import load_reward

    root = resolve_generators_dir(generators_dir)
    if not root.is_dir():
        raise RunDirError(f"{root}: generators directory does not exist (expected run directories "
                          f"{', '.join(GENERATOR_RUNS)} inside it)")
    present = [name for name in GENERATOR_RUNS if (root / name / "run.json").is_file()]
    if not present:
        raise RunDirError(f"{root}: no generator runs; expected at least one of "
                          f"{', '.join(f'{n}/run.json' for n in GENERATOR_RUNS)}")
    sources = GeneratorSources(root=root.resolve())
    for name in present:
        run_dir = (root / name).resolve()
        sources.runs[name] = {"run_dir": str(run_dir), "weights_sha256": _weights_sha256(run_dir)}
    if "text2image" in present:
        sources.text2image, sources.text2image_config = load_text2image(root / "text2image")
        sources.text_encoder = HFTextEncoder(sources.text_encoder_name,
                                             max_tokens=sources.text2image.config.max_text_tokens)
    if "pix2pix" in present:
        sources.pix2pix = load_pix2pix(root / "pix2pix")
    if "selector" in present:
        sources.selector = load_selector(root / "selector")
    if "reward" in present:
        sources.reward = load_reward(root / "reward")
    return sources


def build_generator_specs(sources: GeneratorSources) -> list[GraphSpec]:
    """Specs of every graph the present runs serve, in manifest order."""
    specs = []
    if sources.pix2pix is not None:
        specs.append(pix2pix_spec(sources.pix2pix))
    if sources.text2image is not None:
        specs += [text_encoder_spec(sources.text_encoder), denoiser_spec(sources.text2image, sources.text_encoder)]
        if sources.text2image.config.latent is not None:
            specs.append(vae_decoder_spec(sources.text2image))
    if sources.selector is not None:
        specs.append(selector_spec(sources.selector))
    if sources.reward is not None:
        specs.append(reward_spec(sources.reward))
    return specs


def pipeline_block(sources: GeneratorSources) -> dict[str, Any]:
    """The manifest's ``pipeline`` block: each present generator's config (and the text encoder's shape)."""
    block: dict[str, Any] = {"kind": "generators"}
    if sources.text2image is not None:
        block["text2image"] = {
            "config": sources.text2image.config.to_dict(),
            "text_encoder": {"name": sources.text_encoder_name, "dim": int(sources.text_encoder.dim),
                             "max_tokens": int(sources.text_encoder.max_tokens)},
        }
    if sources.pix2pix is not None:
        block["pix2pix"] = {"config": sources.pix2pix.config.to_dict()}
    if sources.selector is not None:
        block["selector"] = {"config": sources.selector.config.to_dict()}
    if sources.reward is not None:
        block["reward"] = {"config": sources.reward.config.to_dict()}
    return block


def _copy_tokenizer(encoder: Any, stage: Path) -> dict[str, Any]:
    from inference.manifest import sha256_file
    from weights.checkpoints import RunDirError

    src = Path(encoder.path) / "tokenizer.json"
    if not src.is_file():
        raise RunDirError(f"{src}: missing; the text encoder folder needs a tokenizer.json (fast tokenizer) "
                          "for the exported text encoder")
    dst = stage / TOKENIZER_ASSET
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return {"file": TOKENIZER_ASSET, "sha256": sha256_file(dst), "bytes": dst.stat().st_size}


def export_generator_artifacts(generators_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
                               fp16: bool = False, opset: int = DEFAULT_OPSET, threads: int = 1,
                               log: Any = None) -> dict[str, Any]:
    """Export the generator runs of ``generators_dir`` into ``out_dir``; returns the manifest.

    Raises:
        weights.checkpoints.RunDirError: no generator runs, or an inconsistent one (names the file).
        export.parity.ParityError: a graph failed parity (nothing is written, ``out_dir`` is untouched).
    """
    # 1. Load the runs (and the text encoder of the text2image run)
    sources = load_generator_sources(generators_dir)
    # 2. Graph specs, pipeline and source blocks
    specs = build_generator_specs(sources)
    pipeline = pipeline_block(sources)
    source: dict[str, Any] = {"kind": "generators", "generators_dir": str(sources.root), "runs": sources.runs}
    if sources.text_encoder is not None:
        source["text_encoder"] = {"name": sources.text_encoder_name, "path": str(Path(sources.text_encoder.path))}
    # 3. Export + parity per graph, the tokenizer asset and the manifest, in a staging directory
    with staging_dir(Path(out_dir)) as stage:
        graphs = export_specs(specs, stage, fp16=fp16, opset=opset, threads=threads, log=log)
        assets = {"tokenizer": _copy_tokenizer(sources.text_encoder, stage)} if sources.text_encoder else None
        manifest = write_artifact_manifest(stage, graphs, pipeline=pipeline, source=source, opset=opset,
                                           fp16=fp16, assets=assets)
    return manifest


# --------------------------------------------------------------------------- verification
def source_runs_usable(manifest: Mapping[str, Any]) -> tuple[bool, str]:
    """Whether every source run still exists with the exported weights (then parity can be re-run)."""
    runs = manifest["source"].get("runs") or {}
    if not runs:
        return False, "manifest names no source runs"
    for name, run in runs.items():
        run_dir = Path(str(run.get("run_dir", "")))
        if not (run_dir / "run.json").is_file():
            return False, f"source run {name!r} ({run_dir}) is not available"
        try:
            sha = _weights_sha256(run_dir)
        except (OSError, ValueError):
            return False, f"source run {name!r} ({run_dir}) has no readable weights"
        if sha != run.get("weights_sha256"):
            return False, f"source run {run_dir} has different weights now than at export"
    return True, ""


def reverify_parity(art_dir: str | os.PathLike[str], manifest: Mapping[str, Any], *,
                    threads: int = 1) -> dict[str, dict[str, Any]]:
    """Re-run parity of every graph against the source runs, with the bounds recorded in the manifest.

    Raises:
        export.parity.ParityError: names the graph file on failure.
    """
    source = manifest["source"]
    sources = load_generator_sources(source["generators_dir"])
    absent = sorted(set(source.get("runs") or {}) - set(sources.runs))
    if absent:
        raise ValueError(f"{source['generators_dir']}: source runs {absent} have disappeared since the export")
    specs = {s.name: s for s in build_generator_specs(sources)}
    return reverify_specs(art_dir, manifest, specs, threads=threads,
                          source=f"the generator runs in {sources.root}")


__all__ = [
    "GENERATOR_RUNS",
    "GeneratorSources",
    "ScorerGraph",
    "TextEncoderGraph",
    "build_generator_specs",
    "denoiser_spec",
    "export_generator_artifacts",
    "load_generator_sources",
    "pipeline_block",
    "pix2pix_spec",
    "reverify_parity",
    "reward_spec",
    "selector_spec",
    "source_runs_usable",
    "text_encoder_spec",
    "vae_decoder_spec",
]
