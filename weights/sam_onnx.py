"""SamOnnxDecoder: the prompt-encoder + mask-decoder half of SAM behind the de-facto SAM ONNX signature.
(Details: docs/architecture.md, "weights".)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.sam import Sam

INPUT_NAMES = ("image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input", "orig_im_size")
OUTPUT_NAMES = ("masks", "iou_predictions", "low_res_masks")
DYNAMIC_AXES = {
    "image_embeddings": {0: "batch"},
    "point_coords": {0: "batch", 1: "num_points"},
    "point_labels": {0: "batch", 1: "num_points"},
    "mask_input": {0: "batch"},
    "has_mask_input": {0: "batch"},
    "masks": {0: "batch", 2: "height", 3: "width"},
    "iou_predictions": {0: "batch"},
    "low_res_masks": {0: "batch"},
}


class SamOnnxDecoder(nn.Module):
    """Export wrapper around a Sam's prompt encoder and mask decoder.

    Args:
        sam: the model (its image encoder is not used).
        return_single_mask: choose one mask per prompt set (official rule: the single-mask token when more
            than 2 points/corners are given, else the best-scoring multimask output); False returns all
            1 + num_multimask_outputs masks.
    """

    def __init__(self, sam: Sam, return_single_mask: bool = True) -> None:
        super().__init__()
        self.model = sam
        self.img_size = sam.img_size
        self.return_single_mask = return_single_mask

    def _embed_points(self, point_coords: torch.Tensor, point_labels: torch.Tensor) -> torch.Tensor:
        """(B, N, 2) input-frame pixels, (B, N) labels -> (B, N, D); no padding point is added."""
        return self.model.prompt_encoder.embed_labelled_points(point_coords + 0.5, point_labels)

    def _embed_masks(self, mask_input: torch.Tensor, has_mask_input: torch.Tensor) -> torch.Tensor:
        """Blend the mask embedding and the no-mask embedding by has_mask_input: (B or 1, D, h, w)."""
        has = has_mask_input.reshape(-1, 1, 1, 1)
        prompt_encoder = self.model.prompt_encoder
        embedding = has * prompt_encoder.mask_downscaling(mask_input)
        return embedding + (1 - has) * prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)

    def _select_masks(
        self, masks: torch.Tensor, iou_preds: torch.Tensor, num_points: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pick one mask per prompt set without control flow: (B, T, h, w), (B, T) -> (B, 1, h, w), (B, 1)."""
        num_tokens = iou_preds.shape[1]
        # +1000 to the single-mask token's score when more than 2.5 points, -1000 otherwise (official rule)
        reweight = (torch.arange(num_tokens, device=iou_preds.device) == 0).to(iou_preds.dtype) * 1000.0
        score = iou_preds + (num_points - 2.5) * reweight
        best = torch.argmax(score, dim=1, keepdim=True)  # (B, 1)
        iou = torch.gather(iou_preds, 1, best)
        index = best[:, :, None, None].expand(-1, 1, masks.shape[2], masks.shape[3])
        return torch.gather(masks, 1, index), iou

    def _postprocess(self, masks: torch.Tensor, orig_im_size: torch.Tensor) -> torch.Tensor:
        """(B, T, 4h, 4w) logits -> (B, T, H, W) logits in the original frame of size orig_im_size (2,) = (H, W)."""
        masks = F.interpolate(masks, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)
        size = orig_im_size.to(torch.float32)
        scale = self.img_size / torch.max(size)
        prepadded = torch.floor(scale * size + 0.5).to(torch.int64)  # ResizeLongestSide rounding
        masks = masks[..., : prepadded[0], : prepadded[1]]
        orig = orig_im_size.to(torch.int64)
        return F.interpolate(masks, size=(orig[0], orig[1]), mode="bilinear", align_corners=False)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        mask_input: torch.Tensor,
        has_mask_input: torch.Tensor,
        orig_im_size: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decode one prompt set per image.

        Args:
            image_embeddings: (B, D, h, w) float32 (batch 1 is broadcast over B prompt sets).
            point_coords: (B, N, 2) float32 xy pixels in the S x S input frame (ResizeLongestSide applied);
                a box is two points, its corners (x0, y0) and (x1, y1).
            point_labels: (B, N) float32: 1 foreground, 0 background, 2 box top-left, 3 box bottom-right,
                -1 padding (pad to a common N).
            mask_input: (B or 1, 1, 4h, 4w) float32 mask logits (zeros when unused).
            has_mask_input: (B,) or (1,) float32, 1 to use mask_input, 0 to ignore it.
            orig_im_size: (2,) float32 (H, W) of the original image, shared by the batch ("sam" framing).

        Returns:
            masks (B, 1, H, W) float32 logits in the original frame, iou_predictions (B, 1),
            low_res_masks (B, 1, 4h, 4w) logits in the input frame (T instead of 1 without return_single_mask).
        """
        sparse = self._embed_points(point_coords, point_labels)
        dense = self._embed_masks(mask_input, has_mask_input)
        masks, scores = self.model.mask_decoder.predict_masks(
            image_embeddings=image_embeddings,
            image_pe=self.model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
        )
        if self.return_single_mask:
            num_points = torch.ones_like(point_labels[0]).sum()  # N as a graph value, not a traced constant
            masks, scores = self._select_masks(masks, scores, num_points)
        upscaled = self._postprocess(masks, orig_im_size)
        return upscaled, scores, masks
