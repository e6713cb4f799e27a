"""The recipe validator: one walk over the schema's type hints.

:func:`build_spec` turns raw YAML data into a spec dataclass, checking every key against the
schema (:mod:`transferkit.recipe.schema`): unknown and missing keys, types, ranges and upper bounds,
finite numbers; relative paths resolve against a base folder. Each error names the full key path,
the value and what is expected.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

from transferkit.errors import RecipeError
from transferkit.recipe.messages import did_you_mean, kind_of
from transferkit.recipe.schema import BUILTIN_PREFIX, yaml_key


def build_spec(cls, raw, path: str, base: Path):
    """An instance of the spec dataclass ``cls`` from ``raw`` (a mapping, or a scalar its ``from_scalar``
    takes), found at key ``path`` ("" for the whole recipe); relative paths resolve against ``base``.

    Raises:
        RecipeError: an unknown or missing key, or a value of the wrong type or out of range.
    """
    if hasattr(cls, "from_scalar"):
        raw = cls.from_scalar(raw)
    if not isinstance(raw, dict):
        raise RecipeError(f"expected a mapping, got {kind_of(raw)} {raw!r}", key=path or "recipe")
    fields = {yaml_key(f): f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            hint = did_you_mean(str(key), list(fields), prefix=f"{path}." if path else "")
            raise RecipeError(f"unknown key {_join(path, key)}{hint}")
    hints = typing.get_type_hints(cls)
    values = {}
    for key, f in fields.items():
        if key in raw:
            values[f.name] = _coerce(raw[key], hints[f.name], _join(path, key), f.metadata, base)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RecipeError(f"missing key {_join(path, key)}: {f.metadata.get('doc') or 'required'}")
    return cls(**values)


def _coerce(value, hint, path, meta, base):
    """``value`` checked against the type ``hint`` and the field's ``meta`` (range, path flag)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = {}
        for option in options:
            try:
                return _coerce(value, option, path, meta, base)
            except RecipeError as e:
                errors[option] = e
        same_kind = [o for o in options if _samekind_of(o, value)]
        if len(same_kind) == 1:  # e.g. a number out of range for "fraction or folder"
            raise errors[same_kind[0]]
        raise RecipeError(f"expected {' or '.join(_describe(o, meta) for o in options)}"
                          f"{' or null' if type(None) in args else ''}, got {kind_of(value)} {value!r}", key=path)
    if dataclasses.is_dataclass(hint):
        return build_spec(hint, value, path, base)
    if origin is Literal:
        if value in args and not isinstance(value, bool):
            return value
        raise RecipeError(f"expected one of {', '.join(map(str, args))}, got {value!r}"
                          f"{did_you_mean(str(value), [str(a) for a in args])}", key=path)
    if origin is list or hint is list:
        if not isinstance(value, list):
            raise RecipeError(f"expected a list, got {kind_of(value)} {value!r}", key=path)
        item = args[0] if args else Any
        return [_coerce(v, item, f"{path}[{i}]", {}, base) for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"expected a mapping, got {kind_of(value)} {value!r}", key=path)
        _check_finite(value, path)
        return dict(value)
    if hint is Any:
        _check_finite(value, path)
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"expected true or false, got {value!r}", key=path)
        return value
    if hint in (int, float):
        return _check_range(_number(value, hint, path, meta), path, meta)
    if hint is str:
        if not isinstance(value, str):
            raise RecipeError(f"expected {_describe(str, meta)}, got {kind_of(value)} {value!r}", key=path)
        return _resolve_path(value, base) if meta.get("path") else value
    raise TypeError(f"schema type {hint!r} at {path} is not supported")  # a bug in the schema


def _number(value, kind, path, meta):
    """``value`` as a finite int or float (``kind``); YAML text such as ``1e-3`` counts as a number."""
    given = value
    if isinstance(value, str):  # YAML reads 1e-3 (no dot) as text
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecipeError(f"expected {_describe(kind, meta)}, got {kind_of(value)} {value!r}", key=path)
    if not math.isfinite(value):  # .nan, .inf, and 1e400 (read as inf)
        raise RecipeError(f"expected a finite {_describe(kind, meta).removeprefix('a ')}, got {given}", key=path)
    if kind is int:
        if float(value) != int(value):
            raise RecipeError(f"expected a whole number, got {value!r}", key=path)
        return int(value)
    return float(value)


_BOUNDS = {"ge": (">=", operator.ge), "gt": (">", operator.gt),
           "le": ("<=", operator.le), "lt": ("<", operator.lt)}


def _check_range(value, path, meta):
    """``value``, if within the field's bounds; a range error adds the reason for an upper bound."""
    for key, (_, within) in _BOUNDS.items():
        if meta.get(key) is not None and not within(value, meta[key]):
            why = f" ({meta['why']})" if meta.get("why") and key in ("le", "lt") else ""
            raise RecipeError(f"expected {_describe(type(value), meta)}, got {value!r}{why}", key=path)
    return value


def _check_finite(value, path: str) -> None:
    """Rejects NaN and infinity anywhere inside a free-form value (options, params, grids)."""
    stack = [(value, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            raise RecipeError(f"expected a finite number, got {item!r}", key=where)
        if isinstance(item, dict):
            stack.extend((v, f"{where}.{k}") for k, v in item.items())
        elif isinstance(item, list):
            stack.extend((v, f"{where}[{i}]") for i, v in enumerate(item))


def _describe(hint, meta) -> str:
    """What a value of type ``hint`` must be, in an error's words: "a number > 0", "a path", ..."""
    if hint in (int, float):
        bounds = " and ".join(f"{sign} {meta[k]}" for k, (sign, _) in _BOUNDS.items() if meta.get(k) is not None)
        noun = "a whole number" if hint is int else "a number"
        return f"{noun} {bounds}" if bounds else noun
    if hint is str:
        return "a path" if meta.get("path") else "text"
    if typing.get_origin(hint) is Literal:
        return " or ".join(map(str, typing.get_args(hint)))
    if typing.get_origin(hint) is list or hint is list:
        return "a list"
    if typing.get_origin(hint) is dict or hint is dict:
        return "a mapping"
    if hint is bool:
        return "true or false"
    return getattr(hint, "__name__", str(hint))


def _samekind_of(hint, value) -> bool:
    """Whether ``value`` is the kind of thing ``hint`` describes (ignoring ranges and choices)."""
    origin = typing.get_origin(hint) or hint
    if isinstance(value, bool):
        return hint is bool
    if isinstance(value, (int, float)):
        return hint in (int, float)
    if isinstance(value, str):
        return hint is str or origin is Literal
    if isinstance(value, dict):
        return origin is dict or dataclasses.is_dataclass(hint)
    return origin is list


def _resolve_path(value: str, base: Path) -> str:
    """An absolute path for a relative one (against ``base``); ``builtin:`` sources and imagenet as they are."""
    if value.startswith(BUILTIN_PREFIX) or value == "imagenet":
        return value
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (base / path).resolve())


def _join(path: str, key) -> str:
    """The key path of ``key`` inside ``path``."""
    return f"{path}.{key}" if path else str(key)
