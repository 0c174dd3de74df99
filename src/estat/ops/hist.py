"""``FastHistogram``: a latency histogram cheap enough for every request.

Kept in its own module so that it can be compiled with the rest of the
per-request code (``scripts/build_native.py``).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from typing import Any


class FastHistogram:
    """A histogram for hot paths, folded into a ``prometheus_client`` Histogram
    (``target``, typed loosely: the fold uses the library's internals).

    ``observe`` is a bisect and two adds. ``flush`` adds the bucket counts to
    the target's per-bucket values (non-cumulative, as the library stores
    them) and its sum.
    """

    __slots__ = ("_bounds", "_counts", "_sum", "_target")

    def __init__(self, target: Any, bounds: Sequence[float]) -> None:
        self._target = target
        self._bounds = list(bounds)
        self._counts = [0] * (len(bounds) + 1)
        self._sum = 0.0

    def observe(self, value: float) -> None:
        self._counts[bisect_left(self._bounds, value)] += 1
        self._sum += value

    def flush(self) -> None:
        # prometheus_client keeps one value object per bucket (upper bounds
        # ending in +Inf) and one for the sum; both have ``inc``.
        buckets = self._target._buckets
        for i, c in enumerate(self._counts):
            if c:
                buckets[i].inc(c)
                self._counts[i] = 0
        if self._sum:
            self._target._sum.inc(self._sum)
            self._sum = 0.0
