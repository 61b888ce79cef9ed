"""Means with 95 % bootstrap intervals, and paired differences, for benchmark tables.

The percentile bootstrap over the units given (runs: subject x seed), with a fixed seed so a table
reads the same every time. Not scipy.stats.bootstrap: scipy is not a dependency of the package, and
its default BCa interval is undefined (NaN, with a warning) when every value is equal, which is
exactly the case of a variant compared with itself (all differences 0); the percentile interval is
[0, 0] there."""

from __future__ import annotations

from typing import Sequence

import numpy as np

LEVEL, RESAMPLES, SEED = 0.95, 10_000, 0


def interval(values: Sequence[float], level: float = LEVEL, resamples: int = RESAMPLES, seed: int = SEED) -> dict:
    """{"mean", "low", "high", "n"}: the mean of `values` and its percentile-bootstrap interval (None
    values left out; with no values all None, with one value low = high = it)."""
    x = np.array([float(v) for v in values if v is not None], dtype=np.float64)
    if x.size == 0:
        return {"mean": None, "low": None, "high": None, "n": 0}
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return {"mean": float(x.mean()), "low": float(low), "high": float(high), "n": int(x.size)}


def paired_difference(values: dict, baseline: dict, **kwargs) -> dict:
    """`interval` of values[key] - baseline[key] over the keys both have a value for (key: a run's
    (subject, seed)), so each difference compares two runs on the same subject with the same seed."""
    keys = [k for k in values if values[k] is not None and baseline.get(k) is not None]
    return interval([values[k] - baseline[k] for k in keys], **kwargs)


def excludes_zero(stat: dict) -> bool:
    """True when the interval lies wholly above or below 0."""
    return stat["low"] is not None and (stat["low"] > 0 or stat["high"] < 0)
