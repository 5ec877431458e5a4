"""``ConfigMixin``: one strict ``from_dict`` / ``to_dict`` for the frozen config dataclasses.

Unknown keys and values of the wrong type raise ``ValueError`` naming the class and the field.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

__all__ = ["ConfigMixin", "check_known_fields", "config_value", "resolve_preset"]

_C = TypeVar("_C", bound="ConfigMixin")
_T = TypeVar("_T")


class ConfigMixin:
    """Mixed into a ``@dataclass(frozen=True)`` config; ``__post_init__`` keeps checking value ranges.

    ``renamed_fields`` maps a field's former name to its name now: configs saved before the rename (run.json,
    manifests) still load, and are written back under the new name.
    """

    renamed_fields: ClassVar[Mapping[str, str]] = {}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: tuples as lists, nested configs as dicts."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls: type[_C], data: Mapping[str, Any]) -> _C:
        """Inverse of :meth:`to_dict`; missing fields take the defaults.

        Raises:
            ValueError: ``data`` is not a mapping, a key is not a field, or a value does not have the
                field's type (lists are accepted for tuples); the message names the class and the field.
        """
        data = _renamed(cls, data)
        check_known_fields(cls, data)
        hints = typing.get_type_hints(cls)
        kwargs = {name: config_value(hints[name], value, f"{cls.__name__}.{name}") for name, value in data.items()}
        return cls(**kwargs)


def _renamed(cls: type[ConfigMixin], data: Any) -> Any:
    if not isinstance(data, Mapping) or not any(old in data for old in cls.renamed_fields):
        return data
    out = dict(data)
    for old, new in cls.renamed_fields.items():
        if old in out:
            if new in out:
                raise ValueError(f"{cls.__name__}: both {old!r} and {new!r} given; {old!r} is the former name "
                                 f"of {new!r}")
            out[new] = out.pop(old)
    return out


def check_known_fields(cls: type, data: Any) -> None:
    """Raise ``ValueError`` unless ``data`` is a mapping whose keys are all fields of dataclass ``cls``."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{cls.__name__}.from_dict expects a dict, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; expected a subset of {sorted(known)}")


def config_value(hint: Any, value: Any, where: str) -> Any:
    """``value`` checked against the type ``hint`` (JSON lists become tuples where a tuple is expected).

    Ints pass for floats unchanged (so a config written back is byte-identical); bools never pass for numbers.
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for arm in args:
            try:
                return config_value(arm, value, where)
            except ValueError:
                continue
        raise ValueError(f"{where}: expected {_name(hint)}, got {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ValueError(f"{where}: expected one of {list(args)}, got {value!r}")
        return value
    if hint is type(None):
        if value is not None:
            raise ValueError(f"{where}: expected None, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        if not args:
            return tuple(value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(config_value(args[0], item, f"{where}[{i}]") for i, item in enumerate(value))
        if len(args) != len(value):
            raise ValueError(f"{where}: expected {len(args)} items, got {len(value)} ({value!r})")
        return tuple(
            config_value(a, item, f"{where}[{i}]") for i, (a, item) in enumerate(zip(args, value, strict=True))
        )
    if origin in (dict, Mapping) or hint is dict:
        if not isinstance(value, Mapping):
            raise ValueError(f"{where}: expected a dict, got {value!r}")
        key_hint, value_hint = args if args else (Any, Any)
        return {config_value(key_hint, k, where): config_value(value_hint, v, f"{where}[{k!r}]")
                for k, v in value.items()}
    if isinstance(hint, type) and dataclasses.is_dataclass(hint) and issubclass(hint, ConfigMixin):
        return value if isinstance(value, hint) else hint.from_dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a string, got {value!r}")
        return value
    return value  # other types (paths, enums): the dataclass's own checks


def resolve_preset(name_or_config: Any, presets: Mapping[str, _T], config_cls: type[_T], *, family: str,
                   builder: str) -> _T:
    """The config ``name_or_config`` stands for: a key of ``presets``, a dict (``config_cls.from_dict``) or a
    ``config_cls``; every model family's builder resolves its argument here.

    Args:
        family: how errors name the family, e.g. ``"gate"`` -> ``unknown gate preset 'x'``.
        builder: how errors name the calling builder, e.g. ``"build_gate"``.

    Raises:
        ValueError: an unknown preset name (the known ones listed), an invalid config dict, another type.
    """
    if isinstance(name_or_config, str):
        if name_or_config not in presets:
            raise ValueError(f"unknown {family} preset {name_or_config!r}; expected one of {sorted(presets)}")
        return presets[name_or_config]
    if isinstance(name_or_config, Mapping):
        return config_cls.from_dict(name_or_config)  # type: ignore[attr-defined]
    if isinstance(name_or_config, config_cls):
        return name_or_config
    raise ValueError(f"{builder}: expected a preset name, dict or {config_cls.__name__}, got "
                     f"{type(name_or_config).__name__}")


def _name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _plain(value: Any) -> Any:
    if isinstance(value, ConfigMixin):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value
