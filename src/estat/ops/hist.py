"""``FastHistogram``: a latency histogram cheap enough for every request.

Kept in its own module so that it can be compiled with the rest of the
per-request code (``scripts/build_native.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class FastHistogram:
    """A histogram for hot paths, folded into a ``prometheus_client`` Histogram
    (``target``, typed loosely: the fold uses the library's internals).

    ``observe`` finds the bucket and does two adds. ``flush`` adds the bucket counts to
    the target's per-bucket values (non-cumulative, as the library stores
    them) and its sum.
    """

    __slots__ = ("_bounds", "_counts", "_sum", "_target")

    def __init__(self, target: Any, bounds: Sequence[float]) -> None:
        self._target = target
        self._bounds: list[float] = sorted(bounds)
        self._counts: list[int] = [0] * (len(bounds) + 1)
        self._sum: float = 0.0

    def observe(self, value: float) -> None:
        # a linear scan, not bisect: most observations fall in the first
        # buckets, and compiled, the loop compares unboxed floats
        i = 0
        for bound in self._bounds:
            if value <= bound:
                break
            i += 1
        self._counts[i] += 1
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
