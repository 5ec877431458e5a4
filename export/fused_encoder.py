"""Export-only image encoder with the relative-position term folded into the attention matmul.
(Details: docs/architecture.md, "export".)
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
from torch import nn

from models.sam.image_encoder import Attention, get_rel_pos

__all__ = ["FusedRelPosAttention", "fused_encoder_spec", "fused_sam"]


class FusedRelPosAttention(nn.Module):
    """Drop-in for a ``models.sam.image_encoder.Attention`` with ``use_rel_pos`` over an (h, w) grid.

    Args:
        attn: the attention module (its qkv / proj layers are used as they are).
        size: (h, w) of the token grid it attends over (the window, or the whole grid for global blocks).
    """

    def __init__(self, attn: Attention, size: tuple[int, int]) -> None:
        super().__init__()
        if not attn.use_rel_pos:
            raise ValueError("FusedRelPosAttention needs an Attention with use_rel_pos=True")
        self.attn = attn
        h, w = size
        with torch.no_grad():
            r_h = get_rel_pos(h, h, attn.rel_pos_h)  # (h, kh, d): query row -> key row
            r_w = get_rel_pos(w, w, attn.rel_pos_w)  # (w, kw, d)
        self.register_buffer("r_h", r_h.transpose(1, 2).contiguous(), persistent=False)  # (h, d, kh)
        self.register_buffer("r_w", r_w.transpose(1, 2).contiguous(), persistent=False)  # (w, d, kw)
        rows = torch.arange(h * w) // w
        cols = torch.arange(h * w) % w
        # (K, kh + kw): key (y', x') has a 1 at column y' and at column kh + x'
        onehot = torch.cat([nn.functional.one_hot(rows, h), nn.functional.one_hot(cols, w)], dim=1)
        self.register_buffer("key_positions", onehot.float(), persistent=False)
        self.size = (h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, h, w, C) -> (B, h, w, C), as ``Attention.forward``."""
        a = self.attn
        b, h, w, _ = x.shape
        # (B, hw, 3, heads, d) -> (3, B * heads, hw, d)
        qkv = a.qkv(x).reshape(b, h * w, 3, a.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, -1, h * w, qkv.shape[-1]).unbind(0)
        n, _, d = q.shape
        grid_q = q.reshape(n, h, w, d)
        rel_h = torch.matmul(grid_q, self.r_h)  # (N, h, w, kh): batched over query rows
        rel_w = torch.matmul(grid_q.transpose(1, 2), self.r_w).transpose(1, 2)  # (N, h, w, kw)
        q_ext = torch.cat([q * a.scale, rel_h.reshape(n, h * w, h), rel_w.reshape(n, h * w, w)], dim=-1)
        k_ext = torch.cat([k, self.key_positions.expand(n, -1, -1)], dim=-1)
        attn = (q_ext @ k_ext.transpose(-2, -1)).softmax(dim=-1)
        out = attn @ v
        # (B * heads, hw, d) -> (B, h, w, heads * d)
        out = out.view(b, a.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
        return a.proj(out)


def fused_sam(sam: nn.Module) -> nn.Module:
    """A deep copy of a refiner (``models.sam.Sam``) whose encoder blocks use :class:`FusedRelPosAttention`.

    Blocks without relative positions keep their attention. The copy is in eval mode.
    """
    fused = copy.deepcopy(sam).eval()
    encoder = fused.image_encoder
    grid = encoder.img_size // encoder.patch_embed.proj.kernel_size[0]
    for block in encoder.blocks:
        if block.attn.use_rel_pos:
            side = block.window_size or grid
            block.attn = FusedRelPosAttention(block.attn, (side, side))
    return fused


def fused_encoder_spec(spec: Any) -> Any:
    """The ``image_encoder`` GraphSpec with its traced module replaced by the fused copy.

    The parity reference stays the unmodified model's, so the export is checked against the original.
    """
    from weights.graphs import ImageEncoderGraph

    return dataclasses.replace(spec, module=ImageEncoderGraph(fused_sam(spec.module.sam)).eval())
