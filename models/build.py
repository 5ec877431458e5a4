"""Builders and registries for every model family, and the run.json ``"config"`` round trip."""

from __future__ import annotations

from typing import Any

from models.gate import GATE_PRESETS, Gate, GateConfig, build_gate
from models.sam import SAM_PRESETS, SamConfig, build_sam, get_sam_config
from models.transunet import TRANSUNET_PRESETS, TransUNet, TransUNetConfig, build_transunet
from models.ultrarefiner import ULTRAREFINER_PRESETS, UltraRefiner, UltraRefinerConfig

CONFIG_PARTS = ("transunet", "refiner", "gate", "ultrarefiner")

PRESETS: dict[str, dict[str, Any]] = {
    "transunet": TRANSUNET_PRESETS,
    "refiner": SAM_PRESETS,
    "gate": GATE_PRESETS,
    "ultrarefiner": ULTRAREFINER_PRESETS,
}

_CONFIG_TYPES: dict[str, type] = {
    "transunet": TransUNetConfig,
    "refiner": SamConfig,
    "gate": GateConfig,
    "ultrarefiner": UltraRefinerConfig,
}


def _resolve_part(part: str, value: Any) -> Any:
    cls = _CONFIG_TYPES[part]
    if isinstance(value, cls):
        return value
    if isinstance(value, str):
        if value not in PRESETS[part]:
            raise ValueError(f"config[{part!r}]: unknown preset {value!r}; expected one of {sorted(PRESETS[part])}")
        return PRESETS[part][value]
    if isinstance(value, dict):
        try:
            return get_sam_config(value) if part == "refiner" else cls.from_dict(value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"config[{part!r}]: {exc}") from exc
    raise ValueError(f"config[{part!r}] must be a preset name or a dict, got {type(value).__name__}")


def resolve_config(config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Resolve a run.json-style config to config objects.

    Args:
        config: ``{"transunet", "refiner", "gate", "ultrarefiner"}`` -> preset name | dict | config object;
            missing parts (or ``None``) mean ``"default"``.

    Returns:
        dict part -> ``TransUNetConfig`` / ``SamConfig`` / ``GateConfig`` / ``UltraRefinerConfig``.

    Raises:
        ValueError: unknown part, unknown preset or invalid field (the message names ``config[part]`` and the field).
    """
    config = {} if config is None else config
    if not isinstance(config, dict):
        raise ValueError(f"model config must be a dict with parts {CONFIG_PARTS}, got {type(config).__name__}")
    unknown = sorted(set(config) - set(CONFIG_PARTS))
    if unknown:
        raise ValueError(f"model config: unknown part(s) {unknown}; expected a subset of {list(CONFIG_PARTS)}")
    return {part: _resolve_part(part, config.get(part, "default")) for part in CONFIG_PARTS}


def config_to_dict(config: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Fully expanded, JSON-ready form of a (partial) config: every part as its ``to_dict()``."""
    return {part: cfg.to_dict() for part, cfg in resolve_config(config).items()}


def build_ultrarefiner(config: dict[str, Any] | None = None) -> UltraRefiner:
    """Build an UltraRefiner (untrained) from a run.json-style config (see ``resolve_config``)."""
    parts = resolve_config(config)
    return UltraRefiner(
        transunet=build_transunet(parts["transunet"]),
        refiner=build_sam(parts["refiner"]),
        gate=build_gate(parts["gate"]),
        config=parts["ultrarefiner"],
    )


__all__ = [
    "CONFIG_PARTS",
    "PRESETS",
    "Gate",
    "GateConfig",
    "TransUNet",
    "TransUNetConfig",
    "UltraRefiner",
    "UltraRefinerConfig",
    "build_gate",
    "build_sam",
    "build_transunet",
    "build_ultrarefiner",
    "config_to_dict",
    "resolve_config",
]
