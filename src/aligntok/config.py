"""Typed configs: nested keyword-only dataclasses, `--set a.b=v` overrides, JSON round trip."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config as plain JSON-able data (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _coerce(value: Any, tp: Any) -> Any:
    """Convert JSON data or an override string's parsed value into the annotated type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        for arg in args:
            try:
                return _coerce(value, arg)
            except (TypeError, ValueError):
                continue
        raise ValueError(f"{value!r} does not fit {tp}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value)
    if origin in (tuple, list):
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ValueError(f"expected a list of {len(args)} items, got {value!r}")
            return tuple(_coerce(v, a) for v, a in zip(value, args))
        inner = args[0] if args else Any
        seq = [_coerce(v, inner) for v in value]
        return tuple(seq) if origin is tuple else seq
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if not any(value == a and type(value) is type(a) for a in allowed):
            raise ValueError(f"expected one of {', '.join(map(repr, allowed))}, got {value!r}")
        return value
    if origin is dict and not isinstance(value, dict):
        raise ValueError(f"expected a mapping, got {value!r}")
    if origin is dict or tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"expected true/false, got {value!r}")
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is str and isinstance(value, str):
        return value
    if tp in (int, float, str) or (isinstance(tp, type) and not isinstance(value, tp)):  # e.g. a bare `dict`
        raise ValueError(f"expected {tp.__name__}, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build a dataclass from a mapping, strictly: unknown keys are errors.

    A config class may define `migrate(data) -> data` (a staticmethod) that rewrites the keys of files
    written by older versions; it runs before the check.
    """
    migrate = getattr(cls, "migrate", None)
    if callable(migrate):
        data = migrate(data)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {sorted(unknown)}; known: {sorted(names)}")
    values = {k: _coerce(v, hints[k]) for k, v in data.items()}
    try:
        return cls(**values)
    except TypeError as e:  # a required field missing
        raise ValueError(f"{cls.__name__}: {e}") from None


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # bare strings need no quotes: --set encoder.name=vgg16


def apply_overrides(cfg: T, overrides: list[str] | tuple[str, ...]) -> T:
    """A copy of `cfg` with `a.b.c=value` overrides applied (values parsed as JSON where they parse)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like key.path=value")
        cfg = _set_path(cfg, key.split("."), _parse_value(raw), key)
    return cfg


def _set_path(node: Any, path: list[str], value: Any, full_key: str) -> Any:
    head = path[0]
    if isinstance(node, (tuple, list)) and node and dataclasses.is_dataclass(node[0]):
        # A sequence of sections (e.g. a recipe's stages) is addressed by position: stages.1.steps=500.
        if not head.isdigit() or int(head) >= len(node):
            raise ValueError(f"--set {full_key}: {head!r} is not an index in 0..{len(node) - 1}")
        if len(path) == 1:
            raise ValueError(f"--set {full_key}: set a field of item {head}, e.g. {full_key}.steps=100")
        items = list(node)
        items[int(head)] = _set_path(items[int(head)], path[1:], value, full_key)
        return type(node)(items)
    if not dataclasses.is_dataclass(node):
        raise ValueError(f"--set {full_key}: {head!r} is inside a value that is not a config section")
    names = {f.name for f in dataclasses.fields(node)}
    if head not in names:
        raise ValueError(
            f"--set {full_key}: {type(node).__name__} has no field {head!r}; known: {sorted(names)}"
        )
    if len(path) == 1:
        hint = typing.get_type_hints(type(node))[head]
        try:
            new = _coerce(value, hint)
        except ValueError as e:
            raise ValueError(f"--set {full_key}: {e}") from None
    else:
        new = _set_path(getattr(node, head), path[1:], value, full_key)
    return dataclasses.replace(node, **{head: new})


def save_json(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(json.dumps(to_dict(cfg), indent=2) + "\n")


def load_json(cls: type[T], path: str | Path) -> T:
    return from_dict(cls, json.loads(Path(path).read_text()))


def check_ranges(
    cfg: Any,
    *,
    positive: tuple[str, ...] = (),
    non_negative: tuple[str, ...] = (),
    probability: tuple[str, ...] = (),
) -> None:
    """Refuse values out of range where a config is built (so `--set` fails before anything runs): fields
    in `positive` must be > 0, in `non_negative` >= 0, in `probability` within [0, 1]; None passes (an
    optional field left unset). NaN fails every check."""
    name = type(cfg).__name__
    rules = [(positive, lambda v: v > 0, "> 0"), (non_negative, lambda v: v >= 0, ">= 0")]
    rules.append((probability, lambda v: 0 <= v <= 1, "within [0, 1]"))
    for fields, ok, text in rules:
        for field in fields:
            value = getattr(cfg, field)
            if value is not None and not ok(value):
                raise ValueError(f"{name}.{field}={value} must be {text}")


def differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted paths where two JSON-like values differ (`stages.1.lr`), for messages that say what changed."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(set(a) | set(b))
        return [d for k in keys for d in differences(a.get(k), b.get(k), f"{prefix}{k}.")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{prefix}{i}.")]
    return [] if a == b else [prefix.rstrip(".") or "(value)"]
