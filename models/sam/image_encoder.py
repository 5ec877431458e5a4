"""SAM's image encoder: a plain ViT with windowed and global attention, decomposed relative positions and a
convolutional neck (ViTDet style).
(Details: docs/architecture.md, "models".)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import LayerNorm2d, MLPBlock
from .flex_attention import flex_attention_rel_pos

ATTN_IMPLS = ("reference", "sdpa", "flex")


def _check_attn_impl(attn_impl: str) -> str:
    if attn_impl not in ATTN_IMPLS:
        raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}")
    return attn_impl


class PatchEmbed(nn.Module):
    """Non-overlapping patch embedding: one strided convolution.

    Args:
        patch_size: kernel size and stride P.
        in_chans: input channels (3).
        embed_dim: output width C.
    """

    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, S, S) -> (B, S/P, S/P, C) channels-last token grid."""
        return self.proj(x).permute(0, 2, 3, 1)


def window_partition(x: torch.Tensor, window_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Split a token grid into non-overlapping windows, zero-padding bottom/right to a multiple of the window.

    Args:
        x: (B, H, W, C) tokens.
        window_size: window side w.

    Returns:
        windows (B * nH * nW, w, w, C) in row-major window order, and the padded size (Hp, Wp).
    """
    b, h, w, c = x.shape
    pad_h = (window_size - h % window_size) % window_size
    pad_w = (window_size - w % window_size) % window_size
    if pad_h > 0 or pad_w > 0:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(b, hp // window_size, window_size, wp // window_size, window_size, c)
    # (B, nH, w, nW, w, C) -> (B, nH, nW, w, w, C) -> one window per row of the batch
    windows = x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, window_size, window_size, c)
    return windows, (hp, wp)


def window_unpartition(
    windows: torch.Tensor, window_size: int, pad_hw: tuple[int, int], hw: tuple[int, int]
) -> torch.Tensor:
    """Inverse of :func:`window_partition`, dropping the padding.

    Args:
        windows: (B * nH * nW, w, w, C).
        window_size: w.
        pad_hw: padded grid size (Hp, Wp).
        hw: original grid size (H, W).

    Returns:
        (B, H, W, C) tokens.
    """
    hp, wp = pad_hw
    h, w = hw
    b = windows.shape[0] // (hp * wp // window_size // window_size)
    x = windows.view(b, hp // window_size, wp // window_size, window_size, window_size, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).contiguous().view(b, hp, wp, -1)
    if hp > h or wp > w:
        x = x[:, :h, :w, :].contiguous()
    return x


def get_rel_pos(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Relative-position embeddings for every (query, key) index pair along one axis.

    Args:
        q_size: number of query positions along the axis.
        k_size: number of key positions along the axis.
        rel_pos: (L, C) table, L = 2 * max(q_size, k_size) - 1 normally; linearly resampled otherwise.

    Returns:
        (q_size, k_size, C) embeddings, entry [i, j] for offset i - j.
    """
    max_rel_dist = int(2 * max(q_size, k_size) - 1)
    if rel_pos.shape[0] != max_rel_dist:
        resized = F.interpolate(rel_pos.reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1), size=max_rel_dist,
                                mode="linear")
        rel_pos = resized.reshape(-1, max_rel_dist).permute(1, 0)
    # scale coordinates of the shorter axis so both span the same range
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * max(q_size / k_size, 1.0)
    relative_coords = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel_pos[relative_coords.long()]


def decomposed_rel_pos_terms(
    q: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    q_size: tuple[int, int],
    k_size: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two factors of the decomposed relative-position attention term (MViTv2).

    Args:
        q: (N, q_h * q_w, C) unscaled queries, N = batch * heads.
        rel_pos_h: (Lh, C) table for the height axis; rel_pos_w: (Lw, C) for the width axis.
        q_size: (q_h, q_w); k_size: (k_h, k_w).

    Returns:
        rel_h (N, q_h, q_w, k_h) and rel_w (N, q_h, q_w, k_w); the attention logit of query (y, x) for key
        (y', x') gains rel_h[..., y, x, y'] + rel_w[..., y, x, x'].
    """
    q_h, q_w = q_size
    k_h, k_w = k_size
    r_h = get_rel_pos(q_h, k_h, rel_pos_h)
    r_w = get_rel_pos(q_w, k_w, rel_pos_w)
    n, _, dim = q.shape
    r_q = q.reshape(n, q_h, q_w, dim)
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, r_h)
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, r_w)
    return rel_h, rel_w


def add_decomposed_rel_pos(
    attn: torch.Tensor,
    q: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    q_size: tuple[int, int],
    k_size: tuple[int, int],
) -> torch.Tensor:
    """Add the decomposed relative-position term to attention logits.

    Args:
        attn: (N, q_h * q_w, k_h * k_w) logits.
        q, rel_pos_h, rel_pos_w, q_size, k_size: as in :func:`decomposed_rel_pos_terms`.

    Returns:
        (N, q_h * q_w, k_h * k_w) logits.
    """
    q_h, q_w = q_size
    k_h, k_w = k_size
    rel_h, rel_w = decomposed_rel_pos_terms(q, rel_pos_h, rel_pos_w, q_size, k_size)
    n = q.shape[0]
    attn = attn.view(n, q_h, q_w, k_h, k_w) + rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]
    return attn.view(n, q_h * q_w, k_h * k_w)


class Attention(nn.Module):
    """Multi-head self-attention over a (B, H, W, C) token grid with optional decomposed relative positions.

    Args:
        dim: token width C.
        num_heads: heads; C must be divisible by it.
        qkv_bias: bias on the fused qkv projection.
        use_rel_pos: add the relative-position term (tables ``rel_pos_h``/``rel_pos_w`` of (2 * size - 1, C / heads)).
        rel_pos_zero_init: start the tables at zero (otherwise a truncated normal, std 0.02).
        input_size: (H, W) the tables are sized for (the window, or the whole grid for global blocks).
        attn_impl: "reference" (explicit softmax), "sdpa" (scaled_dot_product_attention with an additive bias)
            or "flex" (FlexAttention with a relative-position score_mod).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        use_rel_pos: bool = False,
        rel_pos_zero_init: bool = True,
        input_size: tuple[int, int] | None = None,
        attn_impl: str = "reference",
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"attention width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.attn_impl = _check_attn_impl(attn_impl)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if self.use_rel_pos:
            if input_size is None:
                raise ValueError("input_size must be given when use_rel_pos is True")
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))
            if not rel_pos_zero_init:
                nn.init.trunc_normal_(self.rel_pos_h, std=0.02)
                nn.init.trunc_normal_(self.rel_pos_w, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        b, h, w, _ = x.shape
        # (B, HW, 3, heads, d) -> (3, B, heads, HW, d)
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        if self.attn_impl == "sdpa":
            out = self._sdpa(qkv, h, w)
        elif self.attn_impl == "flex":
            out = self._flex(qkv, h, w)
        else:
            out = self._reference(qkv, h, w)
        # (B * heads, HW, d) -> (B, H, W, heads * d)
        out = out.view(b, self.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
        return self.proj(out)

    def _reference(self, qkv: torch.Tensor, h: int, w: int) -> torch.Tensor:
        q, k, v = qkv.reshape(3, -1, h * w, qkv.shape[-1]).unbind(0)  # each (B * heads, HW, d)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if self.use_rel_pos:
            attn = add_decomposed_rel_pos(attn, q, self.rel_pos_h, self.rel_pos_w, (h, w), (h, w))
        attn = attn.softmax(dim=-1)
        return attn @ v

    def _sdpa(self, qkv: torch.Tensor, h: int, w: int) -> torch.Tensor:
        q, k, v = qkv.unbind(0)  # each (B, heads, HW, d)
        b, heads, n, d = q.shape
        bias = None
        if self.use_rel_pos:
            rel_h, rel_w = decomposed_rel_pos_terms(
                q.reshape(b * heads, n, d), self.rel_pos_h, self.rel_pos_w, (h, w), (h, w)
            )
            # materialise (B, heads, HW, HW): logit bias for query (y, x) and key (y', x')
            bias = (rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]).reshape(b, heads, n, n)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        return out.reshape(b * heads, n, d)

    def _flex(self, qkv: torch.Tensor, h: int, w: int) -> torch.Tensor:
        q, k, v = qkv.unbind(0)  # each (B, heads, HW, d)
        b, heads, n, d = q.shape
        rel_h = rel_w = None
        if self.use_rel_pos:
            rel_h, rel_w = decomposed_rel_pos_terms(
                q.reshape(b * heads, n, d), self.rel_pos_h, self.rel_pos_w, (h, w), (h, w)
            )
            # factors only: (B, heads, HW, h) and (B, heads, HW, w); the score_mod adds them per key
            rel_h, rel_w = rel_h.reshape(b, heads, n, h), rel_w.reshape(b, heads, n, w)
        out = flex_attention_rel_pos(q, k, v, rel_h, rel_w, scale=self.scale)
        return out.reshape(b * heads, n, d)


class Block(nn.Module):
    """Pre-norm transformer block with windowed (window_size > 0) or global (window_size == 0) attention.

    Args:
        dim: token width C.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width / C.
        qkv_bias, use_rel_pos, rel_pos_zero_init, attn_impl: passed to :class:`Attention`.
        norm_layer: normalisation class called as ``norm_layer(dim)``.
        act_layer: MLP activation class.
        window_size: attention window side; 0 for global attention.
        input_size: (H, W) of the token grid (used to size global relative-position tables).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        act_layer: type[nn.Module] = nn.GELU,
        use_rel_pos: bool = False,
        rel_pos_zero_init: bool = True,
        window_size: int = 0,
        input_size: tuple[int, int] | None = None,
        attn_impl: str = "reference",
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(
            dim,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            use_rel_pos=use_rel_pos,
            rel_pos_zero_init=rel_pos_zero_init,
            input_size=input_size if window_size == 0 else (window_size, window_size),
            attn_impl=attn_impl,
        )
        self.norm2 = norm_layer(dim)
        self.mlp = MLPBlock(embedding_dim=dim, mlp_dim=int(dim * mlp_ratio), act=act_layer)
        self.window_size = window_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            h, w = x.shape[1], x.shape[2]
            x, pad_hw = window_partition(x, self.window_size)
        x = self.attn(x)
        if self.window_size > 0:
            x = window_unpartition(x, self.window_size, pad_hw, (h, w))
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class _LayerNormEps6(nn.LayerNorm):
    """nn.LayerNorm with eps 1e-6 (SAM's encoder norm)."""

    def __init__(self, normalized_shape: int) -> None:
        super().__init__(normalized_shape, eps=1e-6)


class ImageEncoderViT(nn.Module):
    """ViT image encoder producing SAM's image embeddings.

    Args:
        img_size: input side S (square, already resized and padded).
        patch_size: patch side P; the embedding grid is S/P x S/P.
        in_chans: input channels.
        embed_dim: token width.
        depth: number of blocks.
        num_heads: attention heads per block.
        mlp_ratio: MLP hidden width / embed_dim.
        out_chans: embedding channels after the neck.
        qkv_bias: bias on qkv projections.
        norm_layer: token normalisation class (LayerNorm with eps 1e-6 by default).
        act_layer: MLP activation class.
        use_abs_pos: learn an absolute position embedding ``pos_embed`` (1, S/P, S/P, embed_dim).
        use_rel_pos: decomposed relative positions in attention.
        rel_pos_zero_init: zero-initialise the relative-position tables.
        window_size: window side for windowed blocks.
        global_attn_indexes: indexes of blocks with global attention.
        attn_impl: "reference", "sdpa" or "flex" (same parameters, see :class:`Attention`).
    """

    def __init__(
        self,
        img_size: int = 1024,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_chans: int = 256,
        qkv_bias: bool = True,
        norm_layer: type[nn.Module] = _LayerNormEps6,
        act_layer: type[nn.Module] = nn.GELU,
        use_abs_pos: bool = True,
        use_rel_pos: bool = True,
        rel_pos_zero_init: bool = True,
        window_size: int = 0,
        global_attn_indexes: tuple[int, ...] = (),
        attn_impl: str = "reference",
    ) -> None:
        super().__init__()
        if img_size % patch_size != 0:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.img_size = img_size
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        self.pos_embed: nn.Parameter | None = None
        if use_abs_pos:
            self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dim))
        self.blocks = nn.ModuleList(
            Block(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                norm_layer=norm_layer,
                act_layer=act_layer,
                use_rel_pos=use_rel_pos,
                rel_pos_zero_init=rel_pos_zero_init,
                window_size=0 if i in global_attn_indexes else window_size,
                input_size=(grid, grid),
                attn_impl=attn_impl,
            )
            for i in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    @property
    def attn_impl(self) -> str:
        """The attention implementation of the blocks: "reference", "sdpa" or "flex"."""
        return self.blocks[0].attn.attn_impl if len(self.blocks) else "reference"

    def set_attn_impl(self, attn_impl: str) -> None:
        """Switch every block to ``attn_impl`` ("reference" | "sdpa" | "flex"); parameters are untouched."""
        _check_attn_impl(attn_impl)
        for blk in self.blocks:
            blk.attn.attn_impl = attn_impl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, S, S) preprocessed images -> (B, out_chans, S/P, S/P) image embeddings."""
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.neck(x.permute(0, 3, 1, 2))
