"""Load TransUNet's official ImageNet-21k weights (``R50+ViT-B_16.npz``, JAX names such as ``conv_root/kernel``)
into our :class:`models.transunet.TransUNet` by name, with the layout changes of the official ``load_from``."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from models.transunet import TransUNet

__all__ = ["NpzLoadReport", "load_transunet_npz", "official_npz_keys"]

_MAX_LISTED = 20
_POSITION_KEY = "Transformer/posembed_input/pos_embedding"
# ImageNet classification parts of the checkpoint that segmentation has no use for (upstream skips them too).
_CLASSIFIER_KEYS = ("cls",)
_CLASSIFIER_PREFIXES = ("head/", "pre_logits/")
_ENCODER_BLOCK = {  # our name inside transformer.encoder.layer.N -> (JAX name, layout)
    "attn.query.weight": ("MultiHeadDotProductAttention_1/query/kernel", "attention_in"),
    "attn.query.bias": ("MultiHeadDotProductAttention_1/query/bias", "vector"),
    "attn.key.weight": ("MultiHeadDotProductAttention_1/key/kernel", "attention_in"),
    "attn.key.bias": ("MultiHeadDotProductAttention_1/key/bias", "vector"),
    "attn.value.weight": ("MultiHeadDotProductAttention_1/value/kernel", "attention_in"),
    "attn.value.bias": ("MultiHeadDotProductAttention_1/value/bias", "vector"),
    "attn.out.weight": ("MultiHeadDotProductAttention_1/out/kernel", "attention_out"),
    "attn.out.bias": ("MultiHeadDotProductAttention_1/out/bias", "vector"),
    "ffn.fc1.weight": ("MlpBlock_3/Dense_0/kernel", "dense"),
    "ffn.fc1.bias": ("MlpBlock_3/Dense_0/bias", "vector"),
    "ffn.fc2.weight": ("MlpBlock_3/Dense_1/kernel", "dense"),
    "ffn.fc2.bias": ("MlpBlock_3/Dense_1/bias", "vector"),
    "attention_norm.weight": ("LayerNorm_0/scale", "vector"),
    "attention_norm.bias": ("LayerNorm_0/bias", "vector"),
    "ffn_norm.weight": ("LayerNorm_2/scale", "vector"),
    "ffn_norm.bias": ("LayerNorm_2/bias", "vector"),
}
_RESNET_UNIT = {  # our name inside body.blockB.unitU -> (JAX name, layout)
    "conv1.weight": ("conv1/kernel", "conv"),
    "conv2.weight": ("conv2/kernel", "conv"),
    "conv3.weight": ("conv3/kernel", "conv"),
    "gn1.weight": ("gn1/scale", "vector"),
    "gn1.bias": ("gn1/bias", "vector"),
    "gn2.weight": ("gn2/scale", "vector"),
    "gn2.bias": ("gn2/bias", "vector"),
    "gn3.weight": ("gn3/scale", "vector"),
    "gn3.bias": ("gn3/bias", "vector"),
    "downsample.weight": ("conv_proj/kernel", "conv"),
    "gn_proj.weight": ("gn_proj/scale", "vector"),
    "gn_proj.bias": ("gn_proj/bias", "vector"),
}
_STEM = "transformer.embeddings.hybrid_model."
_TOP = {
    "transformer.embeddings.patch_embeddings.weight": ("embedding/kernel", "conv"),
    "transformer.embeddings.patch_embeddings.bias": ("embedding/bias", "vector"),
    "transformer.encoder.encoder_norm.weight": ("Transformer/encoder_norm/scale", "vector"),
    "transformer.encoder.encoder_norm.bias": ("Transformer/encoder_norm/bias", "vector"),
    _STEM + "root.conv.weight": ("conv_root/kernel", "conv"),
    _STEM + "root.gn.weight": ("gn_root/scale", "vector"),
    _STEM + "root.gn.bias": ("gn_root/bias", "vector"),
}


@dataclass(frozen=True)
class NpzLoadReport:
    """What :func:`load_transunet_npz` did.

    Attributes:
        loaded: our parameter names set from the file (every ``transformer.*`` parameter).
        ignored: the file's ImageNet classifier keys (``head/*``, ``pre_logits/*``, ``cls``), unused.
        position_embedding: ``"copied"``, ``"class token dropped"`` or ``"resized GxG -> HxH"``.
    """

    loaded: tuple[str, ...]
    ignored: tuple[str, ...]
    position_embedding: str


def official_npz_keys(model: TransUNet) -> dict[str, tuple[str, str]]:
    """Our parameter name -> (official npz key, layout) for every weight the official ``load_from`` sets.

    Layouts: ``conv`` HWIO kernel -> OIHW; ``dense`` (in, out) -> (out, in); ``attention_in`` (D, heads, D/heads)
    -> (D, D) transposed; ``attention_out`` (heads, D/heads, D) -> (D, D) transposed; ``vector`` flattened;
    ``position`` see :func:`load_transunet_npz`. The decoder and segmentation head have no official weights.
    """
    mapping = dict(_TOP)
    mapping["transformer.embeddings.position_embeddings"] = (_POSITION_KEY, "position")
    for n in range(len(model.transformer.encoder.layer)):
        for ours, (theirs, layout) in _ENCODER_BLOCK.items():
            mapping[f"transformer.encoder.layer.{n}.{ours}"] = (f"Transformer/encoderblock_{n}/{theirs}", layout)
    body = model.transformer.embeddings.hybrid_model.body
    for block_name, block in body.named_children():
        for unit_name, unit in block.named_children():
            for ours, (theirs, layout) in _RESNET_UNIT.items():
                if ours.split(".")[0] in dict(unit.named_children()):
                    mapping[f"{_STEM}body.{block_name}.{unit_name}.{ours}"] = (
                        f"{block_name}/{unit_name}/{theirs}", layout)
    return mapping


def _expected_shapes(layout: str, shape: tuple[int, ...], heads: int) -> list[tuple[int, ...]]:
    """File shapes that convert to a parameter of ``shape`` (empty list: any shape with as many elements)."""
    if layout == "conv":
        out_c, in_c, kh, kw = shape
        return [(kh, kw, in_c, out_c)]
    if layout == "dense":
        return [shape[::-1]]
    if layout == "attention_in":
        return [(shape[1], heads, shape[0] // heads), (shape[1], shape[0])]
    if layout == "attention_out":
        return [(heads, shape[1] // heads, shape[0]), (shape[1], shape[0])]
    return []


def _convert(array: np.ndarray, layout: str, shape: tuple[int, ...]) -> np.ndarray:
    if layout == "conv":
        return array.transpose(3, 2, 0, 1)
    if layout == "dense":
        return array.T
    if layout in ("attention_in", "attention_out"):
        return array.reshape(shape[1], shape[0]).T
    return array.reshape(shape)


def _position_embedding(posemb: np.ndarray, target: tuple[int, ...], path: Path) -> tuple[np.ndarray, str]:
    """The official position-table rule: copy; drop the class token; or drop it and zoom the grid (order 1)."""
    _, tokens, dim = target
    if posemb.ndim != 3 or posemb.shape[0] != 1 or posemb.shape[2] != dim:
        raise ValueError(f"{path}: key {_POSITION_KEY!r} has shape {posemb.shape}, expected (1, N, {dim})")
    if posemb.shape[1] == tokens:
        return posemb, "copied"
    if posemb.shape[1] == tokens + 1:
        return posemb[:, 1:], "class token dropped"
    grid_old, grid_new = int(np.sqrt(posemb.shape[1] - 1)), int(np.sqrt(tokens))
    if grid_old**2 != posemb.shape[1] - 1 or grid_new**2 != tokens:
        raise ValueError(f"{path}: key {_POSITION_KEY!r} has {posemb.shape[1]} tokens; expected {tokens}, "
                         f"{tokens + 1} or a square grid plus a class token")
    grid = posemb[0, 1:].reshape(grid_old, grid_old, dim)
    zoom = (grid_new / grid_old, grid_new / grid_old, 1)
    resized = ndimage.zoom(grid, zoom, order=1).reshape(1, tokens, dim)
    return resized, f"resized {grid_old}x{grid_old} -> {grid_new}x{grid_new}"


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f", ... ({len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else "")


def load_transunet_npz(model: TransUNet, path: str | Path) -> NpzLoadReport:
    """Set ``model``'s encoder (ResNet stem, patch embedding, positions, transformer) from an official npz.

    Every key the official ``VisionTransformer.load_from`` reads must be present with its official shape, and
    no other key but the ImageNet classifier's; nothing is set unless all is well. The position table is copied,
    stripped of its class token, or (for another ``img_size``) bilinearly zoomed from the checkpoint's grid, as
    upstream does.

    Args:
        model: a TransUNet whose config matches the checkpoint (``"r50-vit-b16"`` for ``R50+ViT-B_16.npz``).
        path: the ``.npz`` file (read with ``allow_pickle=False``).

    Returns:
        an :class:`NpzLoadReport`.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not an npz archive, or missing / unexpected keys or shape mismatches (all listed, with the
            file name).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"TransUNet npz checkpoint not found: {path}")
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{path}: not a readable .npz archive ({exc})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: holds a single array, expected an .npz archive of named arrays")
    heads = model.config.num_heads
    params = dict(model.named_parameters())
    mapping = official_npz_keys(model)
    with archive:
        present = set(archive.files)
        missing = sorted(f"{theirs} (for {ours})" for ours, (theirs, _) in mapping.items() if theirs not in present)
        used = {theirs for theirs, _ in mapping.values()}
        ignored = sorted(k for k in present - used if k in _CLASSIFIER_KEYS or k.startswith(_CLASSIFIER_PREFIXES))
        unexpected = sorted(present - used - set(ignored))
        mismatched, converted, position_rule = [], {}, ""
        for ours, (theirs, layout) in mapping.items():
            if theirs not in present:
                continue
            array = archive[theirs]
            shape = tuple(params[ours].shape)
            if layout == "position":
                converted[ours], position_rule = _position_embedding(array, shape, path)
                continue
            allowed = _expected_shapes(layout, shape, heads)
            fits = array.shape in allowed if allowed else array.size == int(np.prod(shape))
            if not fits:
                expected = " or ".join(map(str, allowed)) if allowed else f"{int(np.prod(shape))} elements"
                mismatched.append(f"{theirs}: file {array.shape} vs expected {expected} (for {ours})")
                continue
            converted[ours] = _convert(array, layout, shape)
        if missing or unexpected or mismatched:
            problems = []
            if missing:
                problems.append(f"missing keys ({len(missing)}): {_listing(missing)}")
            if unexpected:  # e.g. more blocks or units than the config has: a different architecture
                problems.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
            if mismatched:
                problems.append(f"shape mismatches ({len(mismatched)}): {_listing(mismatched)}")
            config = model.config
            raise ValueError(
                f"{path} does not match TransUNet config (resnet_units={list(config.resnet_units)}, resnet_width="
                f"{config.resnet_width}, in_channels={config.in_channels}, hidden_size={config.hidden_size}, "
                f"num_layers={config.num_layers}): " + "; ".join(problems)
            )
    with torch.no_grad():
        for ours, array in converted.items():
            params[ours].copy_(torch.from_numpy(np.ascontiguousarray(array)).to(params[ours].dtype))
    return NpzLoadReport(loaded=tuple(sorted(converted)), ignored=tuple(ignored), position_embedding=position_rule)
