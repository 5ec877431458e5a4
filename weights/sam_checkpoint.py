"""Load official SAM / MedSAM weights (``sam_vit_b_01ec64.pth``, ``medsam_vit_b.pth``, or a .safetensors file)
into our :class:`models.sam.Sam`, strictly: every key present, no extra key, every shape equal."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from models.sam import Sam, SamConfig, build_sam, get_sam_config

_WRAPPER_KEYS = ("model", "state_dict")
_MAX_LISTED = 20


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(path), device="cpu"))
    if suffix in (".pth", ".pt", ".bin", ".ckpt"):
        obj: Any = torch.load(str(path), map_location="cpu", weights_only=True)
        # some re-saved checkpoints wrap the state dict in {"model": ...} or {"state_dict": ...}
        for key in _WRAPPER_KEYS:
            if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
        if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise ValueError(f"{path}: expected a state dict of tensors, got {type(obj).__name__}")
        return dict(obj)
    raise ValueError(
        f"{path}: unsupported checkpoint suffix {suffix!r} (expected .pth, .pt, .bin, .ckpt or .safetensors)"
    )


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f", ... ({len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else "")


def load_sam_checkpoint(
    path: str | Path,
    config_name_or_config: str | SamConfig | Mapping[str, Any],
    *,
    prefix: str = "",
    attn_impl: str | None = None,
) -> Sam:
    """Build a Sam for the config and load official weights into it strictly.

    Args:
        path: .pth / .pt (``torch.load(weights_only=True)``; a {"model": ...} or {"state_dict": ...} wrapper is
            unwrapped) or .safetensors file holding the official parameter names.
        config_name_or_config: preset name ("vit_b", "medsam_vit_b", ...), SamConfig or config dict.
        prefix: only keys starting with this prefix are used, with the prefix removed (e.g. "model." or
            "refiner."); the default "" uses every key.
        attn_impl: override the image-encoder attention ("reference" | "sdpa").

    Returns:
        the Sam in eval mode on the CPU.

    Raises:
        FileNotFoundError: no such file.
        ValueError: unreadable content, or missing / unexpected keys or shape mismatches (all listed, with the
            file name).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SAM checkpoint not found: {path}")
    state = _read_state_dict(path)
    if prefix:
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not state:
            raise ValueError(f"{path}: no key starts with prefix {prefix!r}")
    config = get_sam_config(config_name_or_config)
    model = build_sam(config, attn_impl=attn_impl)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(state)
        if tuple(state[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"missing keys ({len(missing)}): {_listing(missing)}")
        if unexpected:
            problems.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
        if mismatched:
            problems.append(f"shape mismatches ({len(mismatched)}): {_listing(mismatched)}")
        raise ValueError(
            f"{path} does not match SAM config (img_size={config.img_size}, "
            f"encoder_embed_dim={config.encoder_embed_dim}, encoder_depth={config.encoder_depth}): "
            + "; ".join(problems)
        )
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)
    return model.eval()
