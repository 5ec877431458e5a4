"""FlexAttention for SAM's image encoder: the decomposed relative-position term as a ``score_mod`` (why and
how it matches the reference: docs/architecture.md, "models").
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch
from torch.nn.attention.flex_attention import flex_attention

ScoreMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def rel_pos_score_mod(rel: torch.Tensor, k_h: int, k_w: int) -> ScoreMod:
    """A ``score_mod`` adding the decomposed relative-position term to each logit.

    Args:
        rel: (B, heads, N, k_h + k_w) both factors side by side: ``rel[..., :k_h]`` = rel_h (query vs key row),
            ``rel[..., k_h:]`` = rel_w (query vs key column).
        k_h, k_w: key grid; keys are numbered row-major, key index = row * k_w + column.

    Returns:
        ``score_mod(score, b, h, q_idx, kv_idx) -> score + rel[b, h, q_idx, kv_idx // k_w]
        + rel[b, h, q_idx, k_h + kv_idx % k_w]``.
    """

    def score_mod(
        score: torch.Tensor, b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor
    ) -> torch.Tensor:
        return score + rel[b, h, q_idx, kv_idx // k_w] + rel[b, h, q_idx, k_h + kv_idx % k_w]

    return score_mod


def _flex_rel_pos(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_h: torch.Tensor | None,
    rel_w: torch.Tensor | None,
    scale: float | None,
) -> torch.Tensor:
    score_mod = None
    if rel_h is not None and rel_w is not None:
        # one captured buffer, freshly built: inductor's CPU flex template (torch 2.13) rejects captured views
        # of in-graph intermediates ("All the buffers in the score and mask subgraph should be in ...")
        rel = torch.cat([rel_h, rel_w], dim=-1)
        score_mod = rel_pos_score_mod(rel, rel_h.shape[-1], rel_w.shape[-1])
    return flex_attention(q, k, v, score_mod=score_mod, scale=scale)


@functools.cache
def _compiled_flex_rel_pos() -> Callable[..., torch.Tensor]:
    """``_flex_rel_pos`` compiled once per process (static shapes: one kernel per window / grid size)."""
    return torch.compile(_flex_rel_pos, dynamic=False, fullgraph=True)


def _check_shapes(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: torch.Tensor | None, rel_w: torch.Tensor | None
) -> None:
    if q.ndim != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            "flex_attention_rel_pos expects q, k, v of one shape (B, heads, N, d), got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if (rel_h is None) != (rel_w is None):
        raise ValueError("flex_attention_rel_pos: rel_h and rel_w must be given together")
    if rel_h is not None and rel_w is not None:
        b, heads, n, _ = q.shape
        if rel_h.shape[:3] != (b, heads, n) or rel_w.shape[:3] != (b, heads, n):
            raise ValueError(
                f"flex_attention_rel_pos: rel_h {tuple(rel_h.shape)} and rel_w {tuple(rel_w.shape)} must start "
                f"with (B, heads, N) = {(b, heads, n)}"
            )
        if rel_h.shape[-1] * rel_w.shape[-1] != n:
            raise ValueError(
                f"flex_attention_rel_pos: key grid k_h x k_w = {rel_h.shape[-1]} x {rel_w.shape[-1]} does not "
                f"hold the N = {n} keys"
            )


def flex_attention_rel_pos(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_h: torch.Tensor | None = None,
    rel_w: torch.Tensor | None = None,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(scale * q k^T + rel_h[.., key_row] + rel_w[.., key_col]) v without an (N, N) bias tensor.

    Args:
        q, k, v: (B, heads, N, d), N = k_h * k_w tokens of a row-major grid (self-attention).
        rel_h: (B, heads, N, k_h) or None; rel_w: (B, heads, N, k_w) or None (both or neither), from
            :func:`models.sam.image_encoder.decomposed_rel_pos_terms` reshaped to (B, heads, ...).
        scale: logit scale; None means d ** -0.5.

    Returns:
        (B, heads, N, d) attention output, dtype of q.

    Raises:
        ValueError: inconsistent shapes (named in the message).
        RuntimeError: gradients requested on the CPU, where torch has no flex-attention backward.
    """
    _check_shapes(q, k, v, rel_h, rel_w)
    if torch.compiler.is_compiling():
        return _flex_rel_pos(q, k, v, rel_h, rel_w, scale)
    if q.device.type == "cuda":
        return _compiled_flex_rel_pos()(q, k, v, rel_h, rel_w, scale)
    tensors = (q, k, v) if rel_h is None or rel_w is None else (q, k, v, rel_h, rel_w)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        raise RuntimeError(
            f"attn_impl='flex' has no backward on the CPU in torch {torch.__version__}; run it under "
            "torch.no_grad() / torch.inference_mode(), or train with attn_impl='reference' or 'sdpa'"
        )
    with warnings.catch_warnings():
        # on the CPU the unfused math path is the intended use (tests, parity), not a performance mistake
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return _flex_rel_pos(q, k, v, rel_h, rel_w, scale)
