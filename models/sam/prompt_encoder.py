"""SAM's prompt encoder: points and box corners become sparse tokens (random Fourier positions plus a learned
embedding per label), a low-resolution mask becomes a dense embedding.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .common import LayerNorm2d


class PositionEmbeddingRandom(nn.Module):
    """Positional encoding with random spatial frequencies (Tancik et al., Fourier features).

    Args:
        num_pos_feats: number of frequencies F; encodings have 2F channels (sin and cos).
        scale: standard deviation of the Gaussian frequency matrix (<= 0 or None means 1).
    """

    def __init__(self, num_pos_feats: int = 64, scale: float | None = None) -> None:
        super().__init__()
        if scale is None or scale <= 0.0:
            scale = 1.0
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn((2, num_pos_feats)))

    def _pe_encoding(self, coords: torch.Tensor) -> torch.Tensor:
        """(..., 2) xy normalised to [0, 1] -> (..., 2F) encodings."""
        coords = 2 * coords - 1
        coords = coords @ self.positional_encoding_gaussian_matrix
        coords = 2 * math.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def forward(self, size: tuple[int, int]) -> torch.Tensor:
        """Encoding of every cell centre of an (h, w) grid: (2F, h, w)."""
        h, w = size
        device = self.positional_encoding_gaussian_matrix.device
        grid = torch.ones((h, w), device=device, dtype=torch.float32)
        y_embed = (grid.cumsum(dim=0) - 0.5) / h
        x_embed = (grid.cumsum(dim=1) - 0.5) / w
        pe = self._pe_encoding(torch.stack([x_embed, y_embed], dim=-1))
        return pe.permute(2, 0, 1)

    def forward_with_coords(self, coords_input: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """Encode pixel coordinates.

        Args:
            coords_input: (B, N, 2) xy pixels in a frame of size ``image_size``.
            image_size: (H, W) of that frame.

        Returns:
            (B, N, 2F) encodings.
        """
        x = coords_input[..., 0:1] / image_size[1]
        y = coords_input[..., 1:2] / image_size[0]
        return self._pe_encoding(torch.cat([x, y], dim=-1).to(torch.float))


class PromptEncoder(nn.Module):
    """Encodes prompts for the mask decoder.

    Args:
        embed_dim: prompt embedding width D (even).
        image_embedding_size: (h, w) of the image embedding grid (S / 16).
        input_image_size: (S, S) of the padded input frame.
        mask_in_chans: hidden channels of the mask downscaler (divisible by 4).
        activation: activation class of the mask downscaler.
    """

    num_point_embeddings = 4  # labels 0 (background), 1 (foreground), 2 / 3 (box top-left / bottom-right)

    def __init__(
        self,
        embed_dim: int,
        image_embedding_size: tuple[int, int],
        input_image_size: tuple[int, int],
        mask_in_chans: int,
        activation: type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.input_image_size = tuple(input_image_size)
        self.image_embedding_size = tuple(image_embedding_size)
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(self.num_point_embeddings))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            activation(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            activation(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of the image embedding grid: (1, D, h, w)."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def embed_labelled_points(self, points: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Embed points whose coordinates are already shifted to pixel centres (+0.5).

        Written with arithmetic masks instead of boolean indexing so that it traces and exports.

        Args:
            points: (B, N, 2) xy in the input frame, pixel centres.
            labels: (B, N) codes: -1 padding (no position), 0 background, 1 foreground, 2 / 3 box corners.

        Returns:
            (B, N, D) sparse embeddings.
        """
        labels = labels[..., None]
        embedding = self.pe_layer.forward_with_coords(points, self.input_image_size)
        embedding = embedding * (labels != -1).to(embedding.dtype)
        embedding = embedding + self.not_a_point_embed.weight * (labels == -1).to(embedding.dtype)
        for i in range(self.num_point_embeddings):
            embedding = embedding + self.point_embeddings[i].weight * (labels == i).to(embedding.dtype)
        return embedding

    def _embed_points(self, points: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        """(B, N, 2) input-frame pixels, (B, N) labels -> (B, N [+1 if pad], D)."""
        points = points + 0.5  # pixel centres
        if pad:
            padding_point = torch.zeros((points.shape[0], 1, 2), device=points.device, dtype=points.dtype)
            padding_label = -torch.ones((labels.shape[0], 1), device=labels.device, dtype=labels.dtype)
            points = torch.cat([points, padding_point], dim=1)
            labels = torch.cat([labels, padding_label], dim=1)
        return self.embed_labelled_points(points, labels)

    def _embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """(B, 4) xyxy input-frame pixels -> (B, 2, D) corner embeddings."""
        coords = (boxes + 0.5).reshape(-1, 2, 2)
        corner_embedding = self.pe_layer.forward_with_coords(coords, self.input_image_size)
        corner_embedding = corner_embedding + torch.stack(
            [self.point_embeddings[2].weight[0], self.point_embeddings[3].weight[0]], dim=0
        )
        return corner_embedding

    def _embed_masks(self, masks: torch.Tensor) -> torch.Tensor:
        """(B, 1, 4h, 4w) mask logits -> (B, D, h, w)."""
        return self.mask_downscaling(masks)

    def no_mask_dense(self, batch_size: int) -> torch.Tensor:
        """Dense embedding used when no mask is given: (batch_size, D, h, w)."""
        return self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
            batch_size, -1, self.image_embedding_size[0], self.image_embedding_size[1]
        )

    def _get_batch_size(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
    ) -> int:
        if points is not None:
            return points[0].shape[0]
        if boxes is not None:
            return boxes.shape[0]
        if masks is not None:
            return masks.shape[0]
        return 1

    def forward(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
        *,
        batch_size: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed any combination of prompts, one prompt set per batch element.

        Args:
            points: ((B, N, 2) xy input-frame pixels, (B, N) labels) or None; padded with one "not a point"
                when no box is given (official behaviour).
            boxes: (B, 4) xyxy input-frame pixels or None.
            masks: (B, 1, 4h, 4w) mask logits or None.
            batch_size: batch size when no prompt is given at all (default 1).

        Returns:
            sparse (B, N', D) with N' = N (+1 padding) (+2 box corners), and dense (B, D, h, w).
        """
        bs = self._get_batch_size(points, boxes, masks)
        if points is None and boxes is None and masks is None and batch_size is not None:
            bs = batch_size
        sparse = torch.empty((bs, 0, self.embed_dim), device=self.point_embeddings[0].weight.device)
        if points is not None:
            coords, labels = points
            sparse = torch.cat([sparse, self._embed_points(coords, labels, pad=boxes is None)], dim=1)
        if boxes is not None:
            sparse = torch.cat([sparse, self._embed_boxes(boxes)], dim=1)
        dense = self._embed_masks(masks) if masks is not None else self.no_mask_dense(bs)
        return sparse, dense
