"""Sam: image encoder + prompt encoder + mask decoder, with preprocessing and mask postprocessing.
(Details: docs/architecture.md, "models".)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import SamConfig
from .image_encoder import ImageEncoderViT
from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder
from .transforms import input_size_for, resize_image, transform_boxes, transform_coords


class Sam(nn.Module):
    """Segment Anything model.

    Args:
        image_encoder: ViT producing (B, D, h, w) embeddings from (B, 3, S, S) inputs.
        prompt_encoder: embeds points, boxes and masks.
        mask_decoder: predicts masks and IoU.
        config: the sizes and the preprocessing style ("sam" or "medsam"); pixel_mean / pixel_std come from it
            and are non-persistent buffers (not in the state dict, like the official model).
    """

    mask_threshold: float = 0.0
    image_format: str = "RGB"

    def __init__(
        self,
        *,
        image_encoder: ImageEncoderViT,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
        config: SamConfig,
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.config = config
        self.register_buffer("pixel_mean", torch.tensor(config.pixel_mean, dtype=torch.float32).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(config.pixel_std, dtype=torch.float32).view(-1, 1, 1), False)

    @property
    def img_size(self) -> int:
        """Side S of the square input frame."""
        return self.image_encoder.img_size

    @property
    def device(self) -> torch.device:
        """Device of the model's buffers and parameters."""
        return self.pixel_mean.device

    # ---- frames -------------------------------------------------------------------------------------------
    def input_size(self, original_size: tuple[int, int]) -> tuple[int, int]:
        """(h, w) of the valid image region in the input frame for an (H, W) original (for postprocess_masks)."""
        return input_size_for(original_size, self.img_size, self.config.preprocess)

    def transform_coords(self, coords: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
        """(..., 2) xy original-frame pixels -> (..., 2) xy input-frame pixels (ResizeLongestSide for "sam",
        a plain per-axis scale for "medsam")."""
        return transform_coords(coords, original_size, self.img_size, self.config.preprocess)

    def transform_boxes(self, boxes: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
        """(..., 4) xyxy original-frame pixels -> (..., 4) xyxy input-frame pixels."""
        return transform_boxes(boxes, original_size, self.img_size, self.config.preprocess)

    # ---- inference steps ----------------------------------------------------------------------------------
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Resize and normalise images into the input frame.

        Args:
            images: (B, 3, H, W) float in [0, 255], original frame (RGB; gray repeated for medical images).

        Returns:
            (B, 3, S, S) float32. "sam": longest side resized to S (bilinear), (x - pixel_mean) / pixel_std,
            zero-padded bottom-right. "medsam": resized to S x S (bilinear), then min-max scaled per image to
            [0, 1] (no mean / std).
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"Sam.preprocess expects (B, 3, H, W) images, got shape {tuple(images.shape)}")
        images = images.to(torch.float32)
        size = self.input_size((images.shape[-2], images.shape[-1]))
        x = resize_image(images, size)
        if self.config.preprocess == "medsam":
            flat = x.flatten(1)
            lo = flat.min(dim=1).values.view(-1, 1, 1, 1)
            hi = flat.max(dim=1).values.view(-1, 1, 1, 1)
            return (x - lo) / torch.clamp(hi - lo, min=1e-8)
        x = (x - self.pixel_mean) / self.pixel_std
        pad_h = self.img_size - x.shape[-2]
        pad_w = self.img_size - x.shape[-1]
        return F.pad(x, (0, pad_w, 0, pad_h))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) preprocessed images -> (B, D, S/16, S/16) image embeddings."""
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, self.img_size, self.img_size):
            raise ValueError(
                f"Sam.encode expects preprocessed (B, 3, {self.img_size}, {self.img_size}), got {tuple(x.shape)}"
            )
        return self.image_encoder(x)

    def decode(
        self,
        image_embeddings: torch.Tensor,
        point_coords: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Predict masks for one prompt set per image.

        Args:
            image_embeddings: (B, D, h, w) from :meth:`encode`; batch 1 is broadcast over B prompt sets.
            point_coords: (B, N, 2) xy pixels in the S x S input frame, or None.
            point_labels: (B, N) 1 foreground, 0 background, 2 / 3 box corners, -1 padding; with point_coords.
            boxes: (B, 4) xyxy pixels in the input frame, or None.
            mask_input: (B, 1, 4h, 4w) mask logits (a previous low_res_logits), or None.
            multimask_output: return ``num_multimask_outputs`` masks instead of one.

        Returns:
            low_res_logits (B, M, 4h, 4w) over the input frame and predicted IoU (B, M).
        """
        if (point_coords is None) != (point_labels is None):
            raise ValueError("Sam.decode: point_coords and point_labels must be given together")
        if point_coords is not None and (point_coords.ndim != 3 or point_coords.shape[-1] != 2):
            raise ValueError(f"Sam.decode: point_coords must be (B, N, 2), got {tuple(point_coords.shape)}")
        if point_labels is not None and tuple(point_labels.shape) != tuple(point_coords.shape[:2]):
            raise ValueError(
                f"Sam.decode: point_labels must be (B, N) = {tuple(point_coords.shape[:2])}, "
                f"got {tuple(point_labels.shape)}"
            )
        if boxes is not None and (boxes.ndim != 2 or boxes.shape[-1] != 4):
            raise ValueError(f"Sam.decode: boxes must be (B, 4), got {tuple(boxes.shape)}")
        expected_mask = (1, *self.prompt_encoder.mask_input_size)
        if mask_input is not None and (mask_input.ndim != 4 or tuple(mask_input.shape[1:]) != expected_mask):
            raise ValueError(f"Sam.decode: mask_input must be (B, {expected_mask}), got {tuple(mask_input.shape)}")
        points = (point_coords, point_labels) if point_coords is not None else None
        sparse, dense = self.prompt_encoder(
            points=points, boxes=boxes, masks=mask_input, batch_size=image_embeddings.shape[0]
        )
        return self.mask_decoder(
            image_embeddings=image_embeddings,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
        )

    def postprocess_masks(
        self, masks: torch.Tensor, input_size: tuple[int, int], original_size: tuple[int, int]
    ) -> torch.Tensor:
        """Upscale low-res logits to the original frame (official semantics): bilinear to S x S, crop the
        valid (h, w) region, bilinear to (H, W).

        Args:
            masks: (B, M, 4h, 4w) logits over the input frame.
            input_size: (h, w) valid region of the input frame (:meth:`input_size`).
            original_size: (H, W) of the original image.

        Returns:
            (B, M, H, W) logits (threshold at ``mask_threshold`` = 0).
        """
        masks = F.interpolate(masks, (self.img_size, self.img_size), mode="bilinear", align_corners=False)
        masks = masks[..., : input_size[0], : input_size[1]]
        return F.interpolate(masks, tuple(original_size), mode="bilinear", align_corners=False)

    # ---- training -----------------------------------------------------------------------------------------
    def forward(
        self,
        images: torch.Tensor,
        point_coords: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Differentiable end-to-end pass: preprocess, encode, decode (gradients flow everywhere).

        Args:
            images: (B, 3, H, W) float in [0, 255] (original frame).
            point_coords, point_labels, boxes, mask_input, multimask_output: as in :meth:`decode`, with
                coordinates already in the input frame (use :meth:`transform_coords` / :meth:`transform_boxes`).

        Returns:
            low_res_logits (B, M, S/4, S/4) and IoU (B, M).
        """
        embeddings = self.encode(self.preprocess(images))
        return self.decode(embeddings, point_coords, point_labels, boxes, mask_input, multimask_output)
