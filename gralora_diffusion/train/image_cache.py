"""Decoded training images kept in memory, so a dataset that fits is decoded once, not at every step.

Only the deterministic part of an item is kept: the image decoded, converted to RGB and resized to
cover its target size (a uint8 array). The random crop and flip still run at every step from the
item's own RNG, so the pixels, and with them the loss sequence and a resumed run, are the same with
and without the cache. Not `functools.lru_cache`: that bounds the number of entries, this the bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import numpy as np


class ImageCache:
    """`get(key, make)`: the cached value of `key`, else `make()`, kept while the total stays within
    `budget_mb` MiB (then later images are decoded at every step, as without the cache)."""

    def __init__(self, budget_mb: int = 0):
        self.budget = budget_mb * 2**20
        self.used = 0
        self.items: dict[Hashable, tuple[np.ndarray, tuple[int, int]]] = {}

    def __len__(self) -> int:
        return len(self.items)

    def get(self, key: Hashable, make: Callable[[], tuple[np.ndarray, tuple[int, int]]]):
        hit = self.items.get(key)
        if hit is not None:
            return hit
        value = make()
        if self.used + value[0].nbytes <= self.budget:
            value[0].setflags(write=False)  # shared by every later read of the item
            self.items[key] = value
            self.used += value[0].nbytes
        return value
