"""Generation pipelines, framework-free (numpy in, numpy out), shared by training's evaluation and the service.
(Details: docs/architecture.md, "inference".)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.errors import InputError
from inference.protocols import Denoiser, ImageScorer, MaskToImage, TextEncoder
from weights.generators import load_pix2pix, load_selector, load_text2image, resolve_generators_dir


class GenerationInputError(InputError):
    """Bad generation arguments; ``field`` names the argument at fault (for HTTP 400 answers)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}", field)


@dataclass(frozen=True)
class GenerationLimits:
    """Accepted argument ranges (inclusive)."""

    min_steps: int = 1
    max_steps: int = 200
    min_guidance: float = 0.0
    max_guidance: float = 30.0
    max_images: int = 16
    max_prompts: int = 32
    max_prompt_chars: int = 300
    max_total_images: int = 64  # prompts x images per prompt, in one call


@dataclass(frozen=True)
class GenerationRequest:
    """One generation call's arguments (see :meth:`Text2ImagePipeline.generate` for their meaning).

    Requests are independent: :meth:`Text2ImagePipeline.sample_many` runs several in one denoising loop
    (the service's batching), and each gets the images it would get alone.
    """

    prompts: list[str]
    modalities: list[str]
    negative_prompts: list[str] | None = None
    guidance_scale: float = 1.5
    steps: int = 25
    seed: int = 0
    num_images: int = 1

    @property
    def image_count(self) -> int:
        return len(self.prompts) * int(self.num_images)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``(B, 1, H, W)`` float in [0, 1] -> ``(B, H, W) uint8``."""
    return np.round(images[:, 0].clamp(0.0, 1.0).cpu().numpy() * 255.0).astype(np.uint8)


class Text2ImagePipeline:
    """Text + modality -> images.

    Args:
        model: a ``models.text2image.Text2ImageModel`` (put in eval mode here), pixel or latent diffusion:
            the loop runs in ``model.config.sample_shape`` and ``model.decode`` makes the images.
        text_encoder: anything with ``encode(prompts) -> (hidden (B, T, D), mask (B, T))``, ``count_tokens``,
            ``dim`` and ``max_tokens`` (``core.text_encoders``); its ``dim`` must match the model's ``text_dim``.
        selector: optional ``models.selector.Selector`` for :meth:`generate_best_of`.
        limits: accepted argument ranges.
    """

    def __init__(self, model: Denoiser, text_encoder: TextEncoder, *, selector: ImageScorer | None = None,
                 limits: GenerationLimits | None = None) -> None:
        from models.text2image import build_sampler

        if int(text_encoder.dim) != model.config.text_dim:
            raise ValueError(f"text encoder width {text_encoder.dim} != the model's text_dim {model.config.text_dim}")
        if int(text_encoder.max_tokens) != model.config.max_text_tokens:
            raise ValueError(f"text encoder max_tokens {text_encoder.max_tokens} != the model's max_text_tokens "
                             f"{model.config.max_text_tokens}")
        self.model = model.eval()
        self.text_encoder = text_encoder
        self.selector = selector.eval() if selector is not None else None
        self.limits = limits or GenerationLimits()
        self._build_sampler = build_sampler

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.model.config.modalities)

    @property
    def image_size(self) -> int:
        return int(self.model.config.image_size)

    # 1. Check inputs -------------------------------------------------------------------------------------

    def _check_prompts(self, field: str, prompts: Any, count: int | None) -> list[str]:
        lim = self.limits
        if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
            raise GenerationInputError(field, f"expected a list of strings, got {type(prompts).__name__}")
        if count is None and not 1 <= len(prompts) <= lim.max_prompts:
            raise GenerationInputError(field, f"{len(prompts)} prompts; expected 1 to {lim.max_prompts}")
        if count is not None and len(prompts) != count:
            raise GenerationInputError(field, f"{len(prompts)} entries; expected one per prompt ({count})")
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise GenerationInputError(field, f"entry {i} is {type(prompt).__name__}; expected a string")
            if len(prompt) > lim.max_prompt_chars:
                raise GenerationInputError(field, f"entry {i} has {len(prompt)} characters; at most "
                                                  f"{lim.max_prompt_chars}")
            tokens = self.text_encoder.count_tokens(prompt)
            if tokens > self.text_encoder.max_tokens:
                raise GenerationInputError(field, f"entry {i} needs {tokens} tokens; the text encoder takes at "
                                                  f"most {self.text_encoder.max_tokens}")
        if field == "prompts" and any(not p.strip() for p in prompts):
            raise GenerationInputError(field, "prompts must not be empty")
        return list(prompts)

    def check_inputs(
        self, prompts: Any, modalities: Any, negative_prompts: Any, guidance_scale: Any, steps: Any, seed: Any,
        num_images: Any,
    ) -> None:
        """Raise :class:`GenerationInputError` naming the first bad argument."""
        lim = self.limits
        prompts = self._check_prompts("prompts", prompts, None)
        if isinstance(modalities, str) or not isinstance(modalities, (list, tuple)):
            raise GenerationInputError("modalities", f"expected a list of strings, got {type(modalities).__name__}")
        if len(modalities) != len(prompts):
            raise GenerationInputError("modalities", f"{len(modalities)} entries; expected one per prompt "
                                                     f"({len(prompts)})")
        unknown = [m for m in modalities if m not in self.modalities]
        if unknown:
            raise GenerationInputError("modalities", f"unknown modality {unknown[0]!r}; expected one of "
                                                     f"{list(self.modalities)}")
        if negative_prompts is not None:
            self._check_prompts("negative_prompts", negative_prompts, len(prompts))
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not (
            lim.min_steps <= steps <= lim.max_steps
        ):
            raise GenerationInputError("steps", f"{steps!r}; expected an integer in [{lim.min_steps}, {lim.max_steps}]")
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) or not (
            math.isfinite(guidance_scale) and lim.min_guidance <= guidance_scale <= lim.max_guidance
        ):
            raise GenerationInputError("guidance_scale", f"{guidance_scale!r}; expected a number in "
                                                         f"[{lim.min_guidance}, {lim.max_guidance}]")
        if isinstance(num_images, bool) or not isinstance(num_images, (int, np.integer)) or not (
            1 <= num_images <= lim.max_images
        ):
            raise GenerationInputError("num_images", f"{num_images!r}; expected an integer in [1, {lim.max_images}]")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**63 - 1024:
            raise GenerationInputError("seed", f"{seed!r}; expected a non-negative integer")
        if len(prompts) * num_images > lim.max_total_images:
            raise GenerationInputError("num_images", f"{len(prompts)} prompts x {num_images} images = "
                                                     f"{len(prompts) * num_images}; at most {lim.max_total_images} "
                                                     "images per call")

    # 2. Generation ---------------------------------------------------------------------------------------

    def sample(
        self,
        prompts: list[str],
        modalities: list[str],
        negative_prompts: list[str] | None = None,
        guidance_scale: float = 1.5,
        steps: int = 25,
        seed: int = 0,
        num_images: int = 1,
    ) -> torch.Tensor:
        """Like :meth:`generate` but returns ``(N * num_images, 1, S, S) float32 in [0, 1]`` (prompt-major)."""
        request = GenerationRequest(prompts, modalities, negative_prompts, guidance_scale, steps, seed, num_images)
        (images,) = self.sample_many([request])
        assert images is not None  # only `wanted` drops a request
        return images

    def check_request(self, request: GenerationRequest) -> None:
        """:meth:`check_inputs` on a :class:`GenerationRequest`."""
        self.check_inputs(request.prompts, request.modalities, request.negative_prompts, request.guidance_scale,
                          request.steps, request.seed, request.num_images)

    @torch.no_grad()
    def sample_many(
        self, requests: list[GenerationRequest], *, wanted: Callable[[int], bool] | None = None
    ) -> list[torch.Tensor | None]:
        """Run several requests together: one denoising loop per distinct ``steps``, one model call per step.

        Every image keeps its own seed (``seed + k``) and guidance weight, so a request's images are those
        it gets alone, up to float rounding of the batched model calls.

        Args:
            requests: the requests to run.
            wanted: optional ``wanted(i) -> bool``, asked once before every denoising step for each request
                ``i`` still in its loop: False drops request ``i``'s images from the loop (its result is None) and a
                loop with no request left stops. A server uses it to stop work whose caller timed out or left.

        Returns:
            per request, ``(len(prompts) * num_images, 1, S, S) float32 in [0, 1]`` (prompt-major), or None
            for a request ``wanted`` dropped.

        Raises:
            GenerationInputError: naming the first bad argument of the first bad request.
        """
        for request in requests:
            self.check_request(request)
        results: list[torch.Tensor | None] = [None] * len(requests)
        for steps in sorted({int(r.steps) for r in requests}):
            group = [i for i, r in enumerate(requests) if int(r.steps) == steps]
            keep = None if wanted is None else (lambda j, group=group: wanted(group[j]))
            images = self._denoise([requests[i] for i in group], steps, keep)
            for i, chunk in zip(group, images, strict=True):
                results[i] = chunk
        return results

    def _denoise(self, requests: list[GenerationRequest], steps: int,
                 wanted: Callable[[int], bool] | None = None) -> list[torch.Tensor | None]:
        """DDIM with classifier-free guidance over every image of ``requests`` (all with ``steps`` steps);
        per request its images, or None when ``wanted`` dropped it (see :meth:`sample_many`)."""
        model, shape = self.model, tuple(self.model.config.sample_shape)
        # 1. Conditions per image (prompt-major within each request)
        prompts = [p for r in requests for p in r.prompts]
        repeats = torch.tensor([r.num_images for r in requests for _ in r.prompts])
        hidden, mask = self.text_encoder.encode(prompts)
        mod = model.modality_ids([m for r in requests for m in r.modalities])
        hidden, mask, mod = (t.repeat_interleave(repeats, 0) for t in (hidden, mask, mod))
        weights = torch.cat([torch.full((r.image_count,), float(r.guidance_scale)) for r in requests])
        # 2. The unconditional / negative branch, with the null modality: only when some image is guided
        do_cfg = bool((weights != 1.0).any())
        if do_cfg:
            negatives = [n for r in requests for n in (r.negative_prompts or [""] * len(r.prompts))]
            u_hidden, u_mask = self.text_encoder.encode(negatives)
            u_hidden, u_mask = u_hidden.repeat_interleave(repeats, 0), u_mask.repeat_interleave(repeats, 0)
            u_mod = torch.full_like(mod, model.null_modality)
            hidden, mask, mod = torch.cat([u_hidden, hidden]), torch.cat([u_mask, mask]), torch.cat([u_mod, mod])
        # 3. Initial noise, one generator per image
        seeds = [int(r.seed) + k for r in requests for k in range(r.image_count)]
        latents = torch.cat([torch.randn(1, *shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
        # 4. Timesteps
        scheduler = self._build_sampler(model.config)
        scheduler.set_timesteps(int(steps))
        # 5. Denoising loop; w = 1 takes the conditional prediction as it is
        w = weights.view(-1, 1, 1, 1)
        owner = torch.repeat_interleave(torch.arange(len(requests)), torch.tensor([r.image_count for r in requests]))
        live = list(range(len(requests)))
        for t in scheduler.timesteps:
            flags = [True] if wanted is None else [wanted(i) for i in live]
            if not all(flags):
                # Drop the images of requests nobody waits for (DDIM steps each image on its own).
                live = [i for i, flag in zip(live, flags, strict=True) if flag]
                if not live:
                    return [None] * len(requests)
                rows = torch.isin(owner, torch.tensor(live)).nonzero()[:, 0]
                both = torch.cat([rows, rows + len(owner)]) if do_cfg else rows
                latents, w, owner = latents[rows], w[rows], owner[rows]
                hidden, mask, mod = hidden[both], mask[both], mod[both]
            x = torch.cat([latents, latents]) if do_cfg else latents
            eps = model(x, t.expand(x.shape[0]), hidden, mask, mod)
            if do_cfg:
                eps_uncond, eps_cond = eps.chunk(2)
                eps = torch.where(w == 1.0, eps_cond, eps_uncond + w * (eps_cond - eps_uncond))
            latents = scheduler.step(eps, t, latents, eta=0.0).prev_sample
        # 6. Back to images in [0, 1] (pixels rescaled, or latents decoded), split per request
        images = model.decode(latents)
        chunks = dict(zip(live, images.split([requests[i].image_count for i in live]), strict=True))
        return [chunks.get(i) for i in range(len(requests))]

    def generate(
        self,
        prompts: list[str],
        modalities: list[str],
        negative_prompts: list[str] | None = None,
        guidance_scale: float = 1.5,
        steps: int = 25,
        seed: int = 0,
        num_images: int = 1,
    ) -> np.ndarray:
        """Generate ``num_images`` per prompt: ``(len(prompts) * num_images, S, S) uint8``, prompt-major.

        Args:
            prompts: text prompts, e.g. ``["chest x-ray, left lower lobe nodule"]``.
            modalities: one modality name per prompt (``self.modalities``).
            negative_prompts: optional, one per prompt; replaces the unconditional branch of guidance.
            guidance_scale: classifier-free guidance weight w (``eps_u + w (eps_c - eps_u)``; 1 = no guidance).
                The default 1.5 suits the small committed model: w >= 3 over-saturates its images.
            steps: DDIM steps. seed: non-negative int. num_images: images per prompt.

        Raises:
            GenerationInputError: (a ``ValueError``) naming the bad argument.
        """
        return to_uint8(self.sample(prompts, modalities, negative_prompts, guidance_scale, steps, seed, num_images))

    def generate_best_of(
        self,
        prompts: list[str],
        modalities: list[str],
        candidates: int = 4,
        negative_prompts: list[str] | None = None,
        guidance_scale: float = 1.5,
        steps: int = 25,
        seed: int = 0,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Generate ``candidates`` images per prompt and keep the selector's best one.

        Returns:
            ``(images (len(prompts), S, S) uint8, scores (len(prompts),) float32)`` with the selector's score
            ``log p(modality) + log p(real)`` of each kept image.
        """
        self.check_candidates(candidates)
        images = self.sample(prompts, modalities, negative_prompts, guidance_scale, steps, seed, candidates)
        return self.select_best(images, modalities, candidates)

    def check_candidates(self, candidates: Any, scorer: ImageScorer | None = None) -> None:
        """Raise :class:`GenerationInputError` unless best-of-``candidates`` can run (ranked by ``scorer``,
        default the selector)."""
        if scorer is None and self.selector is None:
            raise GenerationInputError("candidates", "best-of-N needs a selector; this pipeline has none")
        if isinstance(candidates, bool) or not isinstance(candidates, (int, np.integer)) or not (
            1 <= candidates <= self.limits.max_images
        ):
            raise GenerationInputError("candidates", f"{candidates!r}; expected an integer in "
                                                     f"[1, {self.limits.max_images}]")

    @torch.no_grad()
    def select_best(
        self, images: torch.Tensor, modalities: list[str], candidates: int, scorer: ImageScorer | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``images (len(modalities) * candidates, 1, S, S)`` in [0, 1], prompt-major -> the best per prompt:
        ``(uint8 (len(modalities), S, S), scores (len(modalities),) float32)``, ranked by ``scorer`` (default
        the selector; a reward model's score is the predicted 1-5 rating)."""
        chosen, scores = self.pick_best(images, modalities, candidates, scorer)
        return to_uint8(chosen), scores.numpy().astype(np.float32)

    @torch.no_grad()
    def pick_best(
        self, images: torch.Tensor, modalities: list[str], candidates: int, scorer: ImageScorer | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`select_best`, in float: ``(images (len(modalities), 1, S, S) in [0, 1], scores
        (len(modalities),))``."""
        self.check_candidates(candidates, scorer)
        scorer = scorer if scorer is not None else self.selector
        count = len(modalities)
        ids = self.model.modality_ids(list(modalities)).repeat_interleave(candidates)
        scores = scorer.score(images, ids).view(count, candidates)
        best = scores.argmax(dim=1)
        chosen = images.view(count, candidates, *images.shape[1:])[torch.arange(count), best]
        return chosen, scores.max(dim=1).values


class Pix2PixPipeline:
    """Masks -> images with a pix2pix generator (eval mode: dropout off, deterministic).

    ``generate(masks (N, H, W) uint8/bool/float, {0, 1} or 0/255) -> (N, H, W) uint8``; masks are resized
    (nearest) to the generator's size and the images back to ``(H, W)`` (bilinear).
    """

    def __init__(self, generator: MaskToImage) -> None:
        self.generator = generator.eval()

    @property
    def image_size(self) -> int:
        return int(self.generator.config.image_size)

    @torch.no_grad()
    def sample(self, masks: np.ndarray | torch.Tensor) -> torch.Tensor:
        """``(N, H, W)`` masks -> ``(N, 1, H, W) float32 in [0, 1]`` images."""
        m = torch.as_tensor(np.asarray(masks))
        if m.ndim != 3 or m.shape[0] < 1:
            raise GenerationInputError("masks", f"shape {tuple(m.shape)}; expected (N, H, W)")
        return torch.cat(self.sample_many(list(m)))

    @torch.no_grad()
    def sample_many(self, masks: list[np.ndarray | torch.Tensor]) -> list[torch.Tensor]:
        """Masks of any sizes ``(H_i, W_i)`` -> ``(1, 1, H_i, W_i) float32 in [0, 1]`` each, one generator call.

        Each mask is binarised (``> 0.5`` after scaling 0/255 masks to [0, 1]), resized (nearest) to the
        generator's size, and its image resized back (bilinear).
        """
        import torch.nn.functional as F

        size = self.image_size
        batch, shapes = [], []
        for index, mask in enumerate(masks):
            m = torch.as_tensor(np.asarray(mask))
            if m.ndim != 2 or min(m.shape) < 1:
                raise GenerationInputError("masks", f"mask {index} has shape {tuple(m.shape)}; expected (H, W)")
            m = m.float()
            if m.max() > 1.0:
                m = m / 255.0
            m = (m > 0.5).float()[None, None]
            shapes.append(tuple(m.shape[-2:]))
            batch.append(F.interpolate(m, size=(size, size), mode="nearest") if shapes[-1] != (size, size) else m)
        out = self.generator(torch.cat(batch)).clamp(0.0, 1.0)
        return [o[None] if shape == (size, size) else
                F.interpolate(o[None], size=shape, mode="bilinear", align_corners=False).clamp(0.0, 1.0)
                for o, shape in zip(out, shapes, strict=True)]

    def generate(self, masks: np.ndarray | torch.Tensor) -> np.ndarray:
        return to_uint8(self.sample(masks))


# ----------------------------------------------------------------------------------------------------------
# Pipelines from run directories (the models come from weights.generators)
# ----------------------------------------------------------------------------------------------------------


def load_text2image_pipeline(
    generators_dir: str | Path = "default", *, text_encoder: TextEncoder | None = None, with_selector: bool = True
) -> Text2ImagePipeline:
    """The pipeline from ``DIR/text2image`` (+ ``DIR/selector`` when present and wanted).

    The text encoder named in the run's config (``config["text_encoder"]["name"]``, default ``"minilm"``) is
    loaded from local files unless one is passed.
    """
    from core.text_encoders import load_text_encoder

    root = resolve_generators_dir(generators_dir)
    model, config = load_text2image(root / "text2image")
    if text_encoder is None:
        name = config.get("text_encoder", {}).get("name", "minilm")
        text_encoder = load_text_encoder(name, max_tokens=model.config.max_text_tokens)
    selector = (
        load_selector(root / "selector") if with_selector and (root / "selector" / "run.json").is_file() else None
    )
    return Text2ImagePipeline(model, text_encoder, selector=selector)


def load_pix2pix_pipeline(generators_dir: str | Path = "default") -> Pix2PixPipeline:
    """The pipeline from ``DIR/pix2pix``."""
    return Pix2PixPipeline(load_pix2pix(resolve_generators_dir(generators_dir) / "pix2pix"))


__all__ = [
    "GenerationInputError",
    "GenerationLimits",
    "GenerationRequest",
    "Pix2PixPipeline",
    "Text2ImagePipeline",
    "load_pix2pix_pipeline",
    "load_text2image_pipeline",
    "to_uint8",
]
