"""The one rule for numbers that come from users, flags and file headers: `finite_number`.

A number is an int or a float (not a bool, not a string), finite (no NaN, no +-inf, no int too
large for a float), optionally within bounds. Everything that takes a number from outside
(alpha and dropout in configs and headers, export's max_size, adapter weights, fuse scales,
training flags) checks it here, so "NaN passes validation" cannot come back in one place only.
No torch import: the CLI checks flags before anything heavy loads.
"""

from __future__ import annotations

import math


def finite_number(value, what: str, error: type[Exception] | None = None, low: float | None = None,
                  high: float | None = None, low_open: bool = False, high_open: bool = False) -> float:
    """`value` as a float, or `error` (default GraloraConfigError) naming `what`: not a number, NaN,
    inf, or outside [low, high] (an open bound with `low_open` / `high_open`)."""
    if error is None:
        from .errors import GraloraConfigError as error
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise error(f"{what}={_show(value)}: must be a number, not {type(value).__name__}.")
    try:
        number = float(value)
    except OverflowError:  # an int beyond float's range
        number = math.inf
    if not math.isfinite(number):
        raise error(f"{what}={_show(value)}: must be a finite number (not NaN or infinite).")
    below = low is not None and (number <= low if low_open else number < low)
    above = high is not None and (number >= high if high_open else number > high)
    if below or above:
        if high is None:
            span = "positive (> 0)" if low == 0 and low_open else f"{'>' if low_open else '>='} {low:g}"
        elif low is None:
            span = f"{'<' if high_open else '<='} {high:g}"
        else:
            span = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise error(f"{what}={_show(value)}: must be {span}.")
    return number


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
