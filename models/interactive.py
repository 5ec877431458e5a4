"""Interactive (MedSAM-style) refinement: user prompts packed as SAM ONNX tokens, decoded to one mask."""

from __future__ import annotations

import torch

from models.sam import Sam

# SAM's ONNX rule returns the single-mask token only for more than 2.5 tokens; fewer (a box alone, one
# click) would pick an untrained multimask output, so prompt sets are padded with "not a point" tokens.
MIN_TOKENS = 3


def pack_tokens(
    points: torch.Tensor | None,
    labels: torch.Tensor | None,
    box: torch.Tensor | None,
    *,
    batch: int,
    min_tokens: int = MIN_TOKENS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM ONNX point format: points with their labels, then the box corners (labels 2, 3), then padding
    points (label -1, coordinate -0.5 so the decoder's +0.5 puts them at 0) up to ``min_tokens``.

    Args:
        points: (B, P, 2) xy pixels of the refiner's S x S frame, or None.
        labels: (B, P) 1 foreground, 0 background, -1 padding; with ``points``.
        box: (B, 4) xyxy pixels of the S x S frame, or None.
        batch: B.
        min_tokens: pad to at least this many tokens.

    Returns:
        coords (B, N, 2) and labels (B, N) float32, N = max(P + 2 * has_box, min_tokens).
    """
    coords = [points.float()] if points is not None else []
    codes = [labels.float()] if labels is not None else []
    if box is not None:
        coords.append(box.float().reshape(batch, 2, 2))  # xyxy -> two corner points
        codes.append(torch.tensor([[2.0, 3.0]], device=box.device).expand(batch, 2))
    have = sum(c.shape[1] for c in coords)
    if have < min_tokens:
        device = coords[0].device if coords else None
        coords.append(torch.full((batch, min_tokens - have, 2), -0.5, device=device))
        codes.append(torch.full((batch, min_tokens - have), -1.0, device=device))
    return torch.cat(coords, dim=1), torch.cat(codes, dim=1)


def decode_tokens(
    sam: Sam,
    embeddings: torch.Tensor,
    coords: torch.Tensor,
    labels: torch.Tensor,
    mask_input: torch.Tensor | None = None,
    has_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The single-mask output for packed tokens: the arithmetic of ``weights.sam_onnx.SamOnnxDecoder`` with
    more than 2.5 tokens (differentiable, used for training).

    Args:
        sam: the refiner.
        embeddings: (B, D, h, w) from ``sam.encode``.
        coords, labels: (B, N, 2), (B, N) from ``pack_tokens``.
        mask_input: (B, 1, 4h, 4w) mask-prompt logits, or None.
        has_mask: (B,) 1 where ``mask_input`` is used, 0 where the "no mask" embedding replaces it.

    Returns:
        low_res_logits (B, 1, 4h, 4w) over the S x S frame and the predicted IoU (B, 1).
    """
    encoder = sam.prompt_encoder
    sparse = encoder.embed_labelled_points(coords + 0.5, labels)
    no_mask = encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
    if mask_input is None:
        dense = no_mask.expand(coords.shape[0], -1, *encoder.image_embedding_size)
    else:
        has = (has_mask if has_mask is not None else torch.ones(coords.shape[0], device=coords.device))
        has = has.reshape(-1, 1, 1, 1).to(mask_input.dtype)
        dense = has * encoder.mask_downscaling(mask_input) + (1 - has) * no_mask
    return sam.mask_decoder(
        image_embeddings=embeddings,
        image_pe=encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=False,
    )
