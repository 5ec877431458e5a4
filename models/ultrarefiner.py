"""UltraRefiner: TransUNet coarse mask -> differentiable prompts + ROI -> SAM refiner -> gated paste-back
(the steps and their frames: docs/architecture.md, "models").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from core.config import ConfigMixin
from models.gate import Gate, apply_gate
from models.prompts import MASK_PROMPT_STYLES, NEGATIVE_POINT_STYLES, PromptSet, mask_prompt, point_and_box
from models.prompts import negative_point as _negative_point
from models.prompts import positive_point as _positive_point
from models.prompts import soft_box as _soft_box
from models.roi import crop_roi, full_image_roi, paste_roi, roi_from_box, to_roi_frame
from models.sam import Sam
from models.transunet import TransUNet

OUTPUT_KEYS = (
    "coarse_logits", "coarse_mask", "sam_mask", "refined_mask", "gate", "residual",
    "box", "points", "iou", "roi", "low_res_logits",
)


@dataclass(frozen=True)
class UltraRefinerConfig(ConfigMixin):
    """Wiring between the coarse model and the refiner (the refiner's input size S comes from its SamConfig).

    Attributes:
        use_roi: crop a square ROI around the coarse box (else the whole image, ROI = [0, 0, L, L]).
        roi_expand_ratio: context added on each side of the box, as a fraction of its side.
        roi_min_fraction: smallest ROI side as a fraction of max(H, W).
        use_points, use_box, use_mask_prompt: which prompts the refiner gets.
        mask_prompt_style: ``"direct"`` or ``"gaussian"`` (see ``models.prompts.mask_prompt``).
        gaussian_sigma: blur std as a fraction of the mask-prompt side (S / 4) for the gaussian style.
        negative_point: ``"corner"`` or ``"centroid"`` (see ``models.prompts.negative_point``).
        box_std_scale: box half-width in weighted standard deviations.
        prompt_prior_mass: pixels of prior mass at the empty-mask fallbacks (see ``models.prompts``).
        box_temperature: soft-box edge width as a fraction of max(H, W) (``"centroid"`` negatives).
        multimask_output: ask for several masks and keep the one with the highest predicted IoU.
        prompt_grad_scale: factor on the gradient that flows from the refiner branch (prompts, ROI) back into the
            coarse probability (upstream's ``transunet_grad_scale``; 1 = unscaled, 0 = blocked). Forward values
            are unchanged.
    """

    use_roi: bool = True
    roi_expand_ratio: float = 0.2
    roi_min_fraction: float = 0.25
    use_points: bool = True
    use_box: bool = True
    use_mask_prompt: bool = True
    mask_prompt_style: str = "direct"
    gaussian_sigma: float = 0.01
    negative_point: str = "corner"
    box_std_scale: float = 2.5
    prompt_prior_mass: float = 0.1
    box_temperature: float = 0.01
    multimask_output: bool = False
    prompt_grad_scale: float = 1.0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type == "bool" and not isinstance(value, bool):
                raise ValueError(f"UltraRefinerConfig.{f.name} must be a bool, got {value!r}")
            if f.type == "float" and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"UltraRefinerConfig.{f.name} must be a number, got {value!r}")
        if self.mask_prompt_style not in MASK_PROMPT_STYLES:
            raise ValueError(
                f"UltraRefinerConfig.mask_prompt_style must be one of {MASK_PROMPT_STYLES}, "
                f"got {self.mask_prompt_style!r}"
            )
        if self.negative_point not in NEGATIVE_POINT_STYLES:
            raise ValueError(
                f"UltraRefinerConfig.negative_point must be one of {NEGATIVE_POINT_STYLES}, "
                f"got {self.negative_point!r}"
            )
        if self.roi_expand_ratio < 0:
            raise ValueError(f"UltraRefinerConfig.roi_expand_ratio must be >= 0, got {self.roi_expand_ratio}")
        if not 0 < self.roi_min_fraction <= 1:
            raise ValueError(f"UltraRefinerConfig.roi_min_fraction must be in (0, 1], got {self.roi_min_fraction}")
        for name in ("gaussian_sigma", "box_std_scale", "prompt_prior_mass", "box_temperature"):
            if getattr(self, name) <= 0:
                raise ValueError(f"UltraRefinerConfig.{name} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.prompt_grad_scale <= 1:
            raise ValueError(f"UltraRefinerConfig.prompt_grad_scale must be in [0, 1], got {self.prompt_grad_scale}")
        if not (self.use_points or self.use_box or self.use_mask_prompt):
            raise ValueError("UltraRefinerConfig: at least one of use_points, use_box, use_mask_prompt must be True")


ULTRAREFINER_PRESETS: dict[str, UltraRefinerConfig] = {
    # refiner fine-tuned on direct mask prompts inside ROIs (phase 2) — the recommended path
    "default": UltraRefinerConfig(),
    # an un-fine-tuned SAM / MedSAM: softer mask prompt (upstream's "skip phase 2" recipe)
    "gaussian": UltraRefinerConfig(mask_prompt_style="gaussian"),
    # whole image to the refiner
    "no_roi": UltraRefinerConfig(use_roi=False),
}


@dataclass
class RoiPrompts:
    """Prompts, ROI and ROI crop for one batch, from ``roi_prompts`` (no refiner preprocessing applied).

    Attributes:
        roi: (B, 4) xyxy square ROI, continuous image frame.
        crop: (B, 1, S, S) the image resampled over the ROI, in [0, 1] (0 where the ROI leaves the image).
        prompts: ``PromptSet`` in the ROI frame (S x S pixels); point_labels (B, 2) = [1, 0];
            mask_logits (B, 1, S/4, S/4).
        image_points: (B, 2, 2) [positive, negative] xy, image pixel frame.
        image_box: (B, 4) xyxy, image pixel frame.
    """

    roi: torch.Tensor
    crop: torch.Tensor
    prompts: PromptSet
    image_points: torch.Tensor
    image_box: torch.Tensor


@dataclass
class RefinerInputs(RoiPrompts):
    """What the refiner needs for one batch, from ``UltraRefiner.prepare_refiner_inputs``: the
    :class:`RoiPrompts` plus ``refiner_image`` (B, 3, S, S), the ROI crop after ``Sam.preprocess`` (ready
    for ``Sam.encode``)."""

    refiner_image: torch.Tensor


def roi_prompts(
    image: torch.Tensor,
    coarse_prob: torch.Tensor,
    config: UltraRefinerConfig,
    *,
    refiner_size: int,
    mask_prompt_size: int,
) -> RoiPrompts:
    """Differentiable prompts from the coarse probability, the square ROI, the ROI crop and the mask prompt.

    Pure tensor arithmetic (step 2 of the module docstring without ``Sam.preprocess``): used by
    ``UltraRefiner.prepare_refiner_inputs`` and by the service pipeline, whose exported image encoder
    preprocesses the crop itself. Every prompt is computed whatever ``config.use_*`` says; the decoder
    call decides which ones the refiner gets.

    Args:
        image: (B, 1, H, W) float32 in [0, 1].
        coarse_prob: (B, 1, H, W) float32 in [0, 1] (gradient scaling, if any, already applied).
        config: the ``UltraRefinerConfig`` (ROI and prompt settings).
        refiner_size: S, side of the refiner's input (= ROI crop) frame.
        mask_prompt_size: side of the mask prompt (S / 4 for SAM).

    Returns:
        ``RoiPrompts`` (see its docstring for frames and shapes).
    """
    cfg, s, m = config, refiner_size, mask_prompt_size
    b, _, h, w = image.shape
    if torch.is_grad_enabled() and coarse_prob.requires_grad:
        pos = _positive_point(coarse_prob, cfg.prompt_prior_mass)
        box = _soft_box(coarse_prob, cfg.box_std_scale, cfg.prompt_prior_mass)
        mass = None
    else:  # inference: one weighted mean for the point, the box and the negative point's mass (same values)
        pos, box, mass = point_and_box(coarse_prob, cfg.box_std_scale, cfg.prompt_prior_mass)
    neg = _negative_point(coarse_prob, box, pos, cfg.negative_point, cfg.box_temperature, cfg.prompt_prior_mass,
                          fg_mass=mass)
    points = torch.stack([pos, neg], dim=1)  # (B, 2, 2) image pixel frame
    if cfg.use_roi:
        roi = roi_from_box(box, (h, w), cfg.roi_expand_ratio, cfg.roi_min_fraction)
    else:
        roi = full_image_roi(b, (h, w), dtype=image.dtype, device=image.device)
    crop = crop_roi(image, roi, s)  # (B, 1, S, S) in [0, 1]
    mask_logits = mask_prompt(
        crop_roi(coarse_prob, roi, m), None, cfg.mask_prompt_style, cfg.gaussian_sigma * m
    )  # (B, 1, S/4, S/4)
    labels = torch.tensor([[1.0, 0.0]], dtype=image.dtype, device=image.device).repeat(b, 1)
    prompts = PromptSet(
        points=to_roi_frame(points, roi, s),
        point_labels=labels,
        box=to_roi_frame(box, roi, s),
        mask_logits=mask_logits,
    )
    return RoiPrompts(roi=roi, crop=crop, prompts=prompts, image_points=points, image_box=box)


def paste_refiner_logits(
    low_res_logits: torch.Tensor, roi: torch.Tensor, image_hw: tuple[int, int], refiner_size: int
) -> torch.Tensor:
    """Refiner logits over the ROI -> refiner probability in the image (0 outside the ROI).

    The low-res logits are upsampled (bilinear, align_corners=False: ``Sam.postprocess_masks`` for a square
    unpadded input) to S x S, passed through a sigmoid and pasted into the image with ``paste_roi``.

    Args:
        low_res_logits: (B, 1, S/4, S/4) ROI frame.
        roi: (B, 4) xyxy continuous frame.
        image_hw: (H, W) of the image.
        refiner_size: S.

    Returns:
        (B, 1, H, W) in [0, 1].
    """
    s = refiner_size
    sam_roi = torch.sigmoid(F.interpolate(low_res_logits, (s, s), mode="bilinear", align_corners=False))
    return paste_roi(sam_roi, roi, tuple(image_hw))


def scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Identity in the forward pass; multiplies the gradient by ``scale`` in the backward pass."""
    if scale == 1.0:
        return x
    return x * scale + (x * (1.0 - scale)).detach()


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize (align_corners=False, no antialiasing so it exports to ONNX Resize); identity when the size
    matches."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class UltraRefiner(nn.Module):
    """End-to-end differentiable coarse-then-refine segmenter.

    Args:
        transunet: coarse model, (B, C, S_t, S_t) in [0, 1] -> (B, 1, S_t, S_t) logits.
        refiner: ``Sam`` (its ``config.img_size`` is the ROI crop side S, ``config.preprocess`` its input scaling).
        gate: ``Gate`` combining coarse and refiner probabilities.
        config: ``UltraRefinerConfig``.
    """

    def __init__(self, *, transunet: TransUNet, refiner: Sam, gate: Gate, config: UltraRefinerConfig) -> None:
        super().__init__()
        self.transunet = transunet
        self.refiner = refiner
        self.gate = gate
        self.config = config

    @property
    def refiner_size(self) -> int:
        """Side S of the refiner's input (= ROI crop) frame."""
        return self.refiner.config.img_size

    @property
    def mask_prompt_size(self) -> int:
        """Side of the mask prompt and of the low-res logits: 4 * (S / patch) = S / 4 for SAM."""
        return 4 * self.refiner.config.embedding_size

    def config_dict(self) -> dict[str, dict[str, Any]]:
        """The four configs as stored in run.json's ``"config"``."""
        return {
            "transunet": self.transunet.config.to_dict(),
            "refiner": self.refiner.config.to_dict(),
            "gate": self.gate.config.to_dict(),
            "ultrarefiner": self.config.to_dict(),
        }

    @staticmethod
    def _check_image(image: torch.Tensor) -> None:
        if image.dim() != 4 or image.shape[1] != 1:
            raise ValueError(f"UltraRefiner expects (B, 1, H, W) images in [0, 1], got {tuple(image.shape)}")

    # ---- 1. coarse ------------------------------------------------------------------------------------------
    def coarse(self, image: torch.Tensor) -> torch.Tensor:
        """Coarse logits at image resolution.

        The image is resized (bilinear, no antialiasing: downscale images much larger than the TransUNet's size
        beforehand) to the TransUNet's size, its gray channel repeated when the TransUNet takes 3 channels, and the
        logits resized back to (H, W).

        Args:
            image: (B, 1, H, W) float32 in [0, 1].

        Returns:
            (B, 1, H, W) logits.
        """
        self._check_image(image)
        s = self.transunet.config.img_size
        x = resize(image, (s, s))
        if self.transunet.config.in_channels != 1:
            x = x.expand(-1, self.transunet.config.in_channels, -1, -1)
        return resize(self.transunet(x), tuple(image.shape[-2:]))

    # ---- 2. prompts and ROI -----------------------------------------------------------------------------------
    def prepare_refiner_inputs(self, image: torch.Tensor, coarse_prob: torch.Tensor) -> RefinerInputs:
        """Prompts from the coarse probability, the ROI, and the preprocessed ROI crop.

        Args:
            image: (B, 1, H, W) float32 in [0, 1].
            coarse_prob: (B, 1, H, W) float32 in [0, 1].

        Returns:
            ``RefinerInputs`` (see its docstring for frames and shapes).
        """
        self._check_image(image)
        if coarse_prob.shape != image.shape:
            raise ValueError(f"coarse_prob {tuple(coarse_prob.shape)} must match image {tuple(image.shape)}")
        prob = scale_grad(coarse_prob, self.config.prompt_grad_scale)
        parts = roi_prompts(image, prob, self.config, refiner_size=self.refiner_size,
                            mask_prompt_size=self.mask_prompt_size)
        refiner_image = self.refiner.preprocess(parts.crop.expand(-1, 3, -1, -1) * 255.0)
        return RefinerInputs(roi=parts.roi, crop=parts.crop, prompts=parts.prompts, image_points=parts.image_points,
                             image_box=parts.image_box, refiner_image=refiner_image)

    # ---- 3. refiner ---------------------------------------------------------------------------------------------
    def decode(self, embeddings: torch.Tensor, prompts: PromptSet) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the refiner's decoder with the prompts this config enables.

        Args:
            embeddings: (B, D, S/16, S/16) from ``refiner.encode``.
            prompts: ``PromptSet`` in the ROI frame.

        Returns:
            low_res_logits (B, 1, S/4, S/4) over the ROI frame and predicted IoU (B, 1); with
            ``multimask_output`` the mask with the highest predicted IoU.
        """
        cfg = self.config
        low, iou = self.refiner.decode(
            embeddings,
            prompts.points if cfg.use_points else None,
            prompts.point_labels if cfg.use_points else None,
            prompts.box if cfg.use_box else None,
            prompts.mask_logits if cfg.use_mask_prompt else None,
            cfg.multimask_output,
        )
        if low.shape[1] > 1:
            best = iou.argmax(dim=1, keepdim=True)  # (B, 1)
            low = torch.gather(low, 1, best.view(-1, 1, 1, 1).expand(-1, 1, *low.shape[-2:]))
            iou = torch.gather(iou, 1, best)
        return low, iou

    # ---- 4. paste back and gate -----------------------------------------------------------------------------------
    def finish(
        self,
        coarse_prob: torch.Tensor,
        low_res_logits: torch.Tensor,
        roi: torch.Tensor,
        image: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Refiner logits -> probability in the image, gate, refined mask.

        The refiner probability in the image is ``paste_refiner_logits`` (0 outside the ROI).

        Args:
            coarse_prob: (B, 1, H, W) in [0, 1].
            low_res_logits: (B, 1, S/4, S/4) ROI frame.
            roi: (B, 4) xyxy continuous frame.
            image: (B, 1, H, W) in [0, 1]; needed by learned / hybrid gates that look at the image.

        Returns:
            dict of (B, 1, H, W) tensors: ``sam_mask`` and ``refined_mask`` in [0, 1], ``gate`` in
            [gate_min, gate_max] (1 for type "none"), ``residual`` = sam_mask - coarse_prob in [-1, 1].
        """
        sam = paste_refiner_logits(low_res_logits, roi, tuple(coarse_prob.shape[-2:]), self.refiner_size)
        gate = self.gate(coarse_prob, sam, image)
        return {
            "sam_mask": sam,
            "refined_mask": apply_gate(coarse_prob, sam, gate),
            "gate": gate,
            "residual": sam - coarse_prob,
        }

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Full differentiable pass (training and evaluation).

        Args:
            image: (B, 1, H, W) float32 in [0, 1].

        Returns:
            dict (all at image resolution unless noted):
                ``coarse_logits`` (B, 1, H, W); ``coarse_mask`` (B, 1, H, W) in [0, 1];
                ``sam_mask``, ``refined_mask`` (B, 1, H, W) in [0, 1]; ``gate`` (B, 1, H, W); ``residual``
                (B, 1, H, W) in [-1, 1]; ``box`` (B, 4) xyxy and ``points`` (B, 2, 2) [positive, negative] xy in
                the image pixel frame; ``iou`` (B, 1) predicted IoU; ``roi`` (B, 4) continuous frame;
                ``low_res_logits`` (B, 1, S/4, S/4) ROI frame.
        """
        coarse_logits = self.coarse(image)
        coarse = torch.sigmoid(coarse_logits)
        inputs = self.prepare_refiner_inputs(image, coarse)
        low, iou = self.decode(self.refiner.encode(inputs.refiner_image), inputs.prompts)
        out = self.finish(coarse, low, inputs.roi, image)
        out.update(
            coarse_logits=coarse_logits,
            coarse_mask=coarse,
            box=inputs.image_box,
            points=inputs.image_points,
            iou=iou,
            roi=inputs.roi,
            low_res_logits=low,
        )
        return out
