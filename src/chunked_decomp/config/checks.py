"""Checks shared by the config fields: a clear ValueError naming the field and what it allows."""

from __future__ import annotations

import math
from typing import Any


def number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if math.isnan(value) or math.isinf(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return value


def integer(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")


def choice(name: str, value: Any, allowed: tuple, optional: bool = False) -> None:
    """``value`` is one of ``allowed`` (or None when ``optional``)."""
    if optional and value is None:
        return
    if value not in allowed:
        suffix = " or None" if optional else ""
        raise ValueError(f"{name} must be one of {allowed}{suffix}, got {value!r}")
