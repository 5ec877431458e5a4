"""Condition fusion for the text + modality generator: text tokens and a learned modality embedding in, the
UNet's cross-attention context out.
(Details: docs/architecture.md, "models".)
"""

from __future__ import annotations

import torch
from torch import nn


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked mean over tokens: ``hidden (B, T, D)``, ``mask (B, T)`` (bool or {0, 1}) -> ``(B, D)``."""
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


class ConditionFusion(nn.Module):
    """Project frozen text features and fuse them with a learned modality embedding.

    Args:
        text_dim: width D of the text encoder's token features (384 for MiniLM-L6).
        cross_attention_dim: width C of the UNet's cross-attention context.
        num_modalities: number of real modalities; index ``num_modalities`` is the null modality.
    """

    def __init__(self, text_dim: int, cross_attention_dim: int, num_modalities: int) -> None:
        super().__init__()
        if min(text_dim, cross_attention_dim, num_modalities) < 1:
            raise ValueError(f"ConditionFusion: text_dim={text_dim}, cross_attention_dim={cross_attention_dim}, "
                             f"num_modalities={num_modalities}; all must be >= 1")
        self.num_modalities = num_modalities
        self.text_proj = nn.Linear(text_dim, cross_attention_dim)
        self.modality_embedding = nn.Embedding(num_modalities + 1, cross_attention_dim)
        self.text_norm = nn.LayerNorm(cross_attention_dim)
        self.modality_norm = nn.LayerNorm(cross_attention_dim)

    @property
    def null_modality(self) -> int:
        """Index of the learned "no modality" row (classifier-free guidance)."""
        return self.num_modalities

    def forward(
        self, text_hidden: torch.Tensor, text_mask: torch.Tensor, modality_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``text_hidden (B, T, D) float``, ``text_mask (B, T)`` bool/{0, 1}, ``modality_ids (B,) int64`` in
        ``[0, num_modalities]`` -> ``(context (B, 1 + T, C), context_mask (B, 1 + T) float {0, 1})``."""
        if text_hidden.ndim != 3 or text_mask.shape != text_hidden.shape[:2]:
            raise ValueError(f"ConditionFusion: text_hidden {tuple(text_hidden.shape)} and text_mask "
                             f"{tuple(text_mask.shape)} must be (B, T, D) and (B, T)")
        if modality_ids.shape != text_hidden.shape[:1]:
            raise ValueError(f"ConditionFusion: modality_ids {tuple(modality_ids.shape)}; expected "
                             f"({text_hidden.shape[0]},)")
        m = self.modality_embedding(modality_ids)  # (B, C)
        tokens = self.text_norm(self.text_proj(text_hidden) + m[:, None, :])
        context = torch.cat([self.modality_norm(m)[:, None, :], tokens], dim=1)
        ones = torch.ones(text_mask.shape[0], 1, dtype=torch.float32, device=text_mask.device)
        return context, torch.cat([ones, text_mask.float()], dim=1)


__all__ = ["ConditionFusion", "mean_pool"]
