"""Typed config objects from plain dicts (YAML): unknown keys, wrong types and bad values fail with one
line naming the dotted field path, with a close-match suggestion for typos.

A dataclass may define `validate(self, path)` to check values; it raises `ConfigError` via `fail`.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin


class ConfigError(ValueError):
    """A bad recipe / config value. str() is the one line shown to the user."""

    def __init__(self, path: str, message: str):
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


class OneLineParser(argparse.ArgumentParser):
    """argparse's own errors (a missing argument, an unknown flag) as one line `PROG: error: ...` and
    exit status 2, like a bad recipe field, instead of a usage block. Subcommand parsers inherit it."""

    def error(self, message):
        print(f"{self.prog}: error: {message} (--help lists the options)", file=sys.stderr, flush=True)
        sys.exit(2)


def fail(path: str, message: str):
    raise ConfigError(path, message)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _type_name(tp) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def suggest(key: str, options) -> str:
    close = difflib.get_close_matches(str(key), [str(o) for o in options], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


_YAML_TRUE, _YAML_FALSE = ("on", "yes", "true"), ("off", "no", "false", "disabled")


def convert(value: Any, tp, path: str):
    """Check/convert `value` to the annotated type `tp`, or raise ConfigError naming `path`."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return convert(value, a, path)
            except ConfigError as e:
                errors.append(e)
        raise errors[0] if len(errors) == 1 else ConfigError(
            path, f"expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is Literal:
        if isinstance(value, bool) and all(isinstance(a, str) for a in get_args(tp)):
            # YAML 1.1 reads unquoted on/off/yes/no as booleans: take the word the user meant
            value = next((w for w in (_YAML_TRUE if value else _YAML_FALSE) if w in get_args(tp)), value)
        if value not in get_args(tp):
            fail(path, f"must be one of {', '.join(repr(a) for a in get_args(tp))}, got {value!r}"
                 + suggest(value, get_args(tp)))
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if value is None:
            value = {}
        if not isinstance(value, dict):
            fail(path, f"expected a mapping, got {type(value).__name__} {value!r}")
        return from_dict(tp, value, path)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            fail(path, f"expected a list, got {type(value).__name__} {value!r}")
        args = get_args(tp)
        item = args[0] if args else Any
        return type(value)(convert(v, item, f"{path}[{i}]") for i, v in enumerate(value)) \
            if origin is list else tuple(convert(v, item, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            fail(path, f"expected a mapping, got {type(value).__name__} {value!r}")
        args = get_args(tp)
        vt = args[1] if args else Any
        return {k: convert(v, vt, _join(path, str(k))) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            fail(path, f"expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            fail(path, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail(path, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            fail(path, f"expected a string, got {value!r}")
        return value
    return value


def from_dict(cls, data: dict, path: str = ""):
    """Build dataclass `cls` from `data`, validating every key; runs `validate(path)` if defined."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            fail(_join(path, str(key)), "unknown key" + suggest(key, fields))
    kwargs = {name: convert(data[name], hints[name], _join(path, name)) for name in fields if name in data}
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        obj.validate(path)
    return obj


def to_dict(obj) -> Any:
    """Plain (YAML-safe) dict of a config object."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def require(cond: bool, path: str, message: str):
    if not cond:
        fail(path, message)
