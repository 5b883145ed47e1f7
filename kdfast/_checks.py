"""Argument checks shared by kdfast's Python entry points: numbers may be Python or numpy
scalars but never bools, and every error names the argument."""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np


def is_integral(value: Any) -> bool:
    """An int or numpy integer, not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def check_int(name: str, value: Any, minimum: int | None = None) -> int:
    """``value`` as an int (any integral number but a bool), at least ``minimum`` if given."""
    if not is_integral(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return value


def check_real(name: str, value: Any, *, finite: bool = False) -> float:
    """``value`` as a float (any real number but a bool); with ``finite``, inf and NaN are errors."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if finite and not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_tile_size(tile_size: Any) -> int:
    """The ops' ``tile_size``: an int >= 0, where ``None`` and 0 mean the default."""
    if tile_size is None:
        return 0
    message = "tile_size must be an int >= 0 (0: the default), got {!r}"
    if not is_integral(tile_size):
        raise TypeError(message.format(tile_size))
    if tile_size < 0:
        raise ValueError(message.format(int(tile_size)))
    return int(tile_size)
