"""Check a value decoded from JSON against a type annotation, converting only what JSON cannot spell.

JSON has no tuples (a list stands for one) and writes `16` for the float 16.0: those two are
converted. Everything else must already have the annotated type — a bool is not an int, an int is
not a bool, a string is not a number — because the value may come from an untrusted file header.
"""

from __future__ import annotations

import math
import types
import typing
from typing import Any


class Mismatch(ValueError):
    """The value does not have the annotated type."""


def conform(value: Any, hint: Any) -> Any:
    """`value` as the type `hint` describes, or Mismatch. Supports the types configs use:
    bool, int, float, str, None, unions, tuple[X, ...], tuple[X, Y], list[X], dict[K, V], Any."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if hint is None or hint is type(None):
        return _expect(value is None, value, hint)
    if origin in (typing.Union, types.UnionType):
        for option in args:
            try:
                return conform(value, option)
            except Mismatch:
                continue
        raise Mismatch(describe(hint))
    if hint is bool:
        return _expect(isinstance(value, bool), value, hint)
    if hint is int:
        return _expect(isinstance(value, int) and not isinstance(value, bool), value, hint)
    if hint is float:
        _expect(isinstance(value, (int, float)) and not isinstance(value, bool), value, hint)
        try:
            number = float(value)
        except OverflowError:
            raise Mismatch("a finite float") from None
        return _expect(math.isfinite(number), number, "a finite float")
    if hint is str:
        return _expect(isinstance(value, str), value, hint)
    if origin is tuple:
        _expect(isinstance(value, (list, tuple)), value, hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(conform(item, args[0]) for item in value)
        _expect(len(value) == len(args), value, hint)
        return tuple(conform(item, arg) for item, arg in zip(value, args))
    if origin is list:
        _expect(isinstance(value, (list, tuple)), value, hint)
        return [conform(item, args[0]) for item in value] if args else list(value)
    if origin is dict:
        _expect(isinstance(value, dict), value, hint)
        if not args:
            return dict(value)
        return {conform(k, args[0]): conform(v, args[1]) for k, v in value.items()}
    if isinstance(hint, type):
        return _expect(isinstance(value, hint), value, hint)
    return value  # an annotation this checker does not model: leave the value to the dataclass


def describe(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) and not typing.get_args(hint) else str(hint).replace("typing.", "")


def _expect(ok: bool, value: Any, hint: Any) -> Any:
    if not ok:
        raise Mismatch(hint if isinstance(hint, str) else describe(hint))
    return value
