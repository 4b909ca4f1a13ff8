"""Argument checks shared by the library's entry points: a bool is never taken for an int."""
from __future__ import annotations

import math


def check_int(name: str, value, low: int | None = None) -> int:
    """``value`` if it is an int (not a bool) and ``>= low``; else ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low):
        raise ValueError(f"{name} must be an int{'' if low is None else f' >= {low}'}, got {value!r}")
    return value


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")
    return value


def check_number(name: str, value, low: float = -math.inf, high: float = math.inf, *,
                 open_low: bool = False, open_high: bool = False) -> float:
    """``float(value)`` if it is a finite int or float (not a bool) in the interval from ``low``
    to ``high`` (open at either end on request); else ``ValueError`` naming ``name``."""
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or value < low or value > high or (open_low and value == low) or (open_high and value == high)):
        bounds = f"{'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
        raise ValueError(f"{name} must be a finite number in {bounds}, got {value!r}")
    return float(value)
