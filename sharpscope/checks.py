"""Checks of single values read from files or options: what is a whole number, what a
real one (a bool is neither; Python counts it as an int)."""

from __future__ import annotations

import math
import typing
from typing import Any


def is_whole(value: Any, low: int | None = None, high: int | None = None) -> bool:
    """An int (not a bool) in [low, high] (either bound may be left open)."""
    return (
        isinstance(value, int)
        and not isinstance(value, bool)
        and (low is None or value >= low)
        and (high is None or value <= high)
    )


def is_real(value: Any, *, finite: bool = False) -> bool:
    """An int or a float (not a bool), finite if asked."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    return not finite or math.isfinite(value)


def fits_annotation(value: Any, hint: Any) -> bool:
    """Whether ``value`` fits the type annotation ``hint`` (``int | None``, ``float | str``,
    ...): a bool is not an int, an int is a float."""
    for kind in typing.get_args(hint) or (hint,):
        if (
            (kind is type(None) and value is None)
            or (kind is bool and isinstance(value, bool))
            or (kind is int and is_whole(value))
            or (kind is float and is_real(value))
            or (kind is str and isinstance(value, str))
            or (typing.get_origin(kind) is dict and is_json_object(value))
        ):
            return True
    return False


def is_json_object(value: Any, depth: int = 0) -> bool:
    """A dict of string keys whose values are plain JSON values (numbers, strings, bools,
    None, and lists and dicts of them, at most 32 deep): what a JSON object reads as."""

    def plain(v: Any, level: int) -> bool:
        if level > 32:
            return False
        if v is None or isinstance(v, bool | int | float | str):
            return True
        if isinstance(v, list):
            return all(plain(item, level + 1) for item in v)
        if isinstance(v, dict):
            return all(isinstance(k, str) and plain(item, level + 1) for k, item in v.items())
        return False

    return isinstance(value, dict) and plain(value, depth)
