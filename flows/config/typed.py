"""Strict conversion of plain YAML data into typed (frozen, keyword-only) dataclasses.

The one place that turns untyped mappings into configs. It rejects unknown keys,
missing keys without a default and wrong types, each with a one-line message naming
the dotted key (``filter.min_image_side: expected int, got str 'abc'``).
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from flows.errors import UserFacingError

T = TypeVar("T")


class ParamsError(UserFacingError, ValueError):
    """A params file that does not match its typed schema; the message names the key."""


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{type(value).__name__} {text}"


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ParamsError as exc:
                errors.append(exc)
        raise ParamsError(f"{key}: expected {_type_name(tp)}, got {_describe(value)}")
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise ParamsError(f"{key}: expected one of {_type_name(tp)}, got {_describe(value)}")
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ParamsError(f"{key}: expected a list, got {_describe(value)}")
        (item_tp, *_rest) = get_args(tp) or (Any,)
        items = [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamsError(f"{key}: expected a mapping, got {_describe(value)}")
        _, val_tp = get_args(tp) or (str, Any)
        return {str(k): _convert(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_mapping(tp, value, key)
    if tp is float:
        # YAML writes 1e-3 as a string unless it has a dot; accept ints and such strings.
        if isinstance(value, bool):
            raise ParamsError(f"{key}: expected float, got {_describe(value)}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ParamsError(f"{key}: expected float, got {_describe(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ParamsError(f"{key}: expected int, got {_describe(value)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ParamsError(f"{key}: expected bool, got {_describe(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ParamsError(f"{key}: expected str, got {_describe(value)}")
    raise TypeError(f"{key}: unsupported annotation {tp!r}")  # a schema bug, not a user error


def from_mapping(cls: type[T], data: Any, prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, strictly. ``prefix`` is the dotted key so far."""
    where = prefix or "<top level>"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ParamsError(f"{where}: expected a mapping, got {_describe(data)}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(map(str, data)) - set(fields))
    if unknown:
        name = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ParamsError(f"{name}: unknown key (allowed here: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, field in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], key)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            if dataclasses.is_dataclass(hints[name]):
                kwargs[name] = from_mapping(hints[name], {}, key)
            else:
                raise ParamsError(f"{key}: missing required key")
    try:
        return cls(**kwargs)
    except ParamsError as exc:  # a range check in __post_init__ names the field; add where it sits
        if prefix and not str(exc).startswith(f"{prefix}."):
            raise ParamsError(f"{prefix}.{exc}") from None
        raise


def at_least(config: Any, low: float, *names: str) -> None:
    """Range check for ``__post_init__``: each named field is >= ``low``."""
    for name in names:
        value = getattr(config, name)
        if not value >= low:  # NaN fails too
            raise ParamsError(f"{name}: must be >= {low}, got {value!r}")


def between(config: Any, low: float, high: float, *names: str, high_open: bool = False) -> None:
    """Range check for ``__post_init__``: each named field is in [low, high] (or [low, high))."""
    for name in names:
        value = getattr(config, name)
        if not (low <= value < high if high_open else low <= value <= high):
            raise ParamsError(f"{name}: must be in [{low}, {high}{')' if high_open else ']'}, got {value!r}")


def not_above(config: Any, low_name: str, high_name: str) -> None:
    """Range check for ``__post_init__``: field ``low_name`` <= field ``high_name``."""
    low, high = getattr(config, low_name), getattr(config, high_name)
    if low > high:
        raise ParamsError(f"{low_name}: must be <= {high_name} ({high!r}), got {low!r}")


def to_mapping(obj: Any) -> Any:
    """Inverse of :func:`from_mapping`: plain dicts/lists, for saving a resolved config."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_mapping(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_mapping(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_mapping(v) for k, v in obj.items()}
    return obj


__all__ = ["ParamsError", "from_mapping", "to_mapping"]
