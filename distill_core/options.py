"""Typed, documented settings: a dataclass field declared with ``option(default, help, ...)`` carries its
one-line help, its allowed range or choices, and whether it may be left at ``None``. From these the
command line gets its flags (``add_flags`` / ``flag_values``), the ComfyUI nodes their widgets and the
panel its start form, and every value is checked where it enters (``check``), with a message that
names the field, the value and what is allowed.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field

import yaml


def option(default, help: str, *, min: float | None = None, max: float | None = None,
           choices: tuple | None = None, factory=None):
    """A dataclass field with its help text and allowed values (``min`` / ``max`` inclusive)."""
    meta = {"help": help, "min": min, "max": max, "choices": choices}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Setting:
    """What one field of a settings dataclass is: name, type, default, help and allowed values."""

    name: str
    kind: type  # int, float, bool, str, tuple (of ints), dict
    default: object
    help: str
    optional: bool  # None is allowed ("the method's / teacher's own value")
    min: float | None = None
    max: float | None = None
    choices: tuple | None = None
    length: int = 0  # tuples: the number of items


def settings(cls) -> list[Setting]:
    """The documented fields of a settings dataclass, in declaration order."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata:
            continue
        kind, optional = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        length = len(default) if isinstance(default, tuple) else 0
        out.append(Setting(f.name, kind, default, f.metadata["help"], optional, f.metadata["min"],
                           f.metadata["max"], f.metadata["choices"], length))
    return out


def _base_type(hint) -> tuple[type, bool]:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _base_type(inner[0])[0], type(None) in args
    origin = typing.get_origin(hint)
    return (origin or hint), False


def check(obj) -> None:
    """Raise ``ValueError`` naming the field when a value of ``obj`` has the wrong type or lies outside
    its range or choices."""
    for s in settings(type(obj)):
        value = getattr(obj, s.name)
        if value is None:
            if not s.optional:
                raise ValueError(f"{s.name} must be set ({s.help})")
            continue
        if s.kind is bool:
            ok = isinstance(value, bool)
        elif s.kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif s.kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
        elif s.kind is tuple:
            ok = isinstance(value, tuple) and len(value) == s.length
        else:
            ok = isinstance(value, s.kind)
        if not ok:
            raise ValueError(f"{s.name} must be a {s.kind.__name__}, got {value!r}")
        if s.choices is not None and value not in s.choices:
            raise ValueError(f"{s.name} must be one of {list(s.choices)}, got {value!r}")
        items = value if isinstance(value, tuple) else (value,) if s.kind in (int, float) else ()
        for v in items:
            if (s.min is not None and v < s.min) or (s.max is not None and v > s.max):
                raise ValueError(f"{s.name} must lie in [{_bound(s.min, '-inf')}, {_bound(s.max, 'inf')}], got "
                                 f"{value!r}")


def _bound(b: float | None, unbounded: str) -> str:
    return unbounded if b is None else f"{b:g}"


def coerce(setting: Setting, value):
    """A value read from YAML or a form in the field's own type (ints for int fields, tuples for pairs)."""
    if value is None:
        return None
    if setting.kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if setting.kind is tuple and isinstance(value, list):
        return tuple(value)
    return value


def sweep(items: list[str]) -> dict[str, list]:
    """Settings to combine, from ``KEY=V1,V2`` items: ``["lr=2e-4,1e-3", "loss=l1"]`` -> {"lr": [0.0002, 0.001],
    "loss": ["l1"]}. Each value is a number where it reads as one (YAML would read ``2e-4`` as a string), else
    YAML (booleans, null, words); a value in brackets is one list (``u_range=[0.1, 0.9]``); dashes in a key
    become underscores."""
    grid = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"a setting is KEY=VALUE or KEY=V1,V2, got {item!r}")
        values = [value] if value.lstrip().startswith("[") else value.split(",")
        grid[key.replace("-", "_")] = [_read_value(v) for v in values]
    return grid


def _read_value(text: str):
    for number in (int, float):
        try:
            return number(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


def whole_number(low: int, high: float = math.inf, wanted: str | None = None) -> typing.Callable[[str], int]:
    """An argparse type: a whole number from ``low`` to ``high``, refused as "VALUE: give ``wanted``" (default:
    the range in words)."""
    wanted = wanted or (f"{low} or more" if high == math.inf else f"a number from {low} to {high}")

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value}: give {wanted}")
        return value

    return parse


#: the argparse type for counts (samples, steps, iterations): a whole number of 1 or more
positive = whole_number(1)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls, skip: set[str] = frozenset()) -> None:
    """One command-line flag per documented field of ``cls`` (``--teacher-substeps``); every flag defaults to
    "not given" (``None``), so a config file's value stands unless a flag overrides it."""
    for s in settings(cls):
        if s.name in skip or s.kind is dict:
            continue
        kwargs: dict = {"dest": s.name, "default": None, "help": _flag_help(s)}
        if s.kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif s.kind is tuple:
            kwargs.update(type=int, nargs=s.length)
        else:
            kwargs["type"] = s.kind
            if s.choices is not None:
                kwargs["choices"] = s.choices
        try:
            parser.add_argument(flag(s.name), **kwargs)
        except argparse.ArgumentError:  # a field several methods declare (teacher_pool): one flag serves all
            continue


def _flag_help(s: Setting) -> str:
    default = "the method's or teacher's own" if s.default is None else repr(s.default)
    bounds = f"; {_bound(s.min, '-inf')}..{_bound(s.max, 'inf')}" if s.min is not None or s.max is not None else ""
    return f"{s.help} (default {default}{bounds})".replace("%", "%%")


def flag_values(args: argparse.Namespace, names) -> dict:
    """The flags given on the command line, among ``names``, as config values."""
    out = {}
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            out[name] = tuple(value) if isinstance(value, list) else value
    return out
