"""Resolving a model family's config argument: a preset name, a config dict or the config itself.

Every ``build_*`` of a model family takes ``name_or_config`` the same way; this is the one place that
interprets it, so the families cannot drift apart in what they accept or how they refuse it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

ConfigT = TypeVar("ConfigT")


def resolve_preset(name_or_config: Any, presets: Mapping[str, ConfigT], config_cls: type[ConfigT], *,
                   family: str, builder: str) -> ConfigT:
    """The config ``name_or_config`` stands for.

    Args:
        name_or_config: a key of ``presets``, a dict for ``config_cls.from_dict``, or a ``config_cls``.
        presets: the family's named presets.
        config_cls: the family's config dataclass (with ``from_dict``).
        family: how errors name the family, e.g. ``"gate"`` -> ``unknown gate preset 'x'``.
        builder: how errors name the calling builder, e.g. ``"build_gate"``.

    Raises:
        ValueError: an unknown preset name (the known ones listed), an invalid config dict (from
            ``from_dict``), or an argument of another type.
    """
    if isinstance(name_or_config, str):
        if name_or_config not in presets:
            raise ValueError(f"unknown {family} preset {name_or_config!r}; expected one of {sorted(presets)}")
        return presets[name_or_config]
    if isinstance(name_or_config, dict):
        return config_cls.from_dict(name_or_config)  # type: ignore[attr-defined]
    if isinstance(name_or_config, config_cls):
        return name_or_config
    raise ValueError(f"{builder}: expected a preset name, dict or {config_cls.__name__}, got "
                     f"{type(name_or_config).__name__}")


__all__ = ["resolve_preset"]
