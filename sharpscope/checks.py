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
        ):
            return True
    return False
