"""SAM's mask decoder: output tokens run through the two-way transformer, hypernetwork MLPs turn mask tokens
into per-mask linear classifiers over upscaled image features, an MLP head predicts each mask's IoU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import LayerNorm2d


class MLP(nn.Module):
    """Plain MLP with ReLU between layers.

    Args:
        input_dim: input width.
        hidden_dim: width of hidden layers.
        output_dim: output width.
        num_layers: number of linear layers (>= 1).
        sigmoid_output: apply a sigmoid to the output.
    """

    def __init__(
        self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int, sigmoid_output: bool = False
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"MLP num_layers must be >= 1, got {num_layers}")
        self.num_layers = num_layers
        hidden = [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(
            nn.Linear(n, k) for n, k in zip([input_dim] + hidden, hidden + [output_dim], strict=True)
        )
        self.sigmoid_output = sigmoid_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., input_dim) -> (..., output_dim)."""
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < self.num_layers - 1 else layer(x)
        if self.sigmoid_output:
            x = torch.sigmoid(x)
        return x


class MaskDecoder(nn.Module):
    """Predicts masks and their IoU from image embeddings and prompt embeddings.

    Args:
        transformer_dim: token width D (divisible by 8).
        transformer: the two-way transformer over width D.
        num_multimask_outputs: masks returned in multimask mode; one extra token gives the single mask.
        activation: activation class of the upscaling path.
        iou_head_depth: layers of the IoU MLP.
        iou_head_hidden_dim: hidden width of the IoU MLP.
    """

    def __init__(
        self,
        *,
        transformer_dim: int,
        transformer: nn.Module,
        num_multimask_outputs: int = 3,
        activation: type[nn.Module] = nn.GELU,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
    ) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.num_mask_tokens = num_multimask_outputs + 1
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            activation(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            activation(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Predict masks, one prompt set per image.

        Args:
            image_embeddings: (B or 1, D, h, w); batch 1 is broadcast over the B prompt sets.
            image_pe: (1, D, h, w) positional encoding of the embedding grid.
            sparse_prompt_embeddings: (B, N, D) point / box tokens.
            dense_prompt_embeddings: (B or 1, D, h, w) mask embeddings.
            multimask_output: return the ``num_multimask_outputs`` masks instead of the single one.

        Returns:
            low-res mask logits (B, M, 4h, 4w) and predicted IoU (B, M), M = num_multimask_outputs or 1.
        """
        masks, iou_pred = self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings
        )
        mask_slice = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, mask_slice], iou_pred[:, mask_slice]

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All mask tokens' outputs: masks (B, 1 + num_multimask_outputs, 4h, 4w), IoU (B, 1 + num_multimask_outputs).

        Arguments as in :meth:`forward`. Index 0 is the single-mask output.
        """
        b = sparse_prompt_embeddings.shape[0]
        for name, t in (("image_embeddings", image_embeddings), ("dense_prompt_embeddings", dense_prompt_embeddings)):
            if not torch.jit.is_tracing() and t.shape[0] not in (1, b):
                raise ValueError(
                    f"{name} has batch {t.shape[0]}, expected 1 or the number of prompt sets {b}"
                )
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.unsqueeze(0).expand(b, -1, -1)
        tokens = torch.cat((output_tokens, sparse_prompt_embeddings), dim=1)  # (B, 1 + M + N, D)

        # batch-1 image embeddings broadcast over prompt sets (official repeat_interleave, same values)
        src = (image_embeddings + dense_prompt_embeddings).expand(b, -1, -1, -1)
        _, c, h, w = src.shape
        hs, src = self.transformer(src, image_pe, tokens)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens, :]

        src = src.transpose(1, 2).reshape(b, c, h, w)
        upscaled = self.output_upscaling(src)  # (B, D / 8, 4h, 4w)
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )  # (B, num_mask_tokens, D / 8)
        _, c_up, h_up, w_up = upscaled.shape
        masks = (hyper_in @ upscaled.reshape(b, c_up, h_up * w_up)).reshape(b, -1, h_up, w_up)
        iou_pred = self.iou_prediction_head(iou_token_out)
        return masks, iou_pred
