"""Retry backoff, one policy for every stage, on an injected random source.

``RetryPolicy.delay(n)`` is the wait before retry ``n`` (1-based):
``base * 2^min(n - 1, exponent_cap)``, capped at ``cap``, then jittered —
``equal`` (half fixed, half random: never retries at once, spreads load),
``full`` (uniform in [0, d]: the AWS advice for contended resources) or
``none`` — and never below ``not_before`` (a ``Retry-After`` the other side
asked for). ``max_attempts`` bounds the attempts (None: unbounded, for a
caller that never gives up, like the uploader holding a batch).

Waiting itself is the caller's, on its ``Clock`` (``Clock.sleep``), so tests
move time instead of sleeping. The loops that use this policy also consult
circuits and deadlines, which is why they are written out rather than
delegated to a retry library.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

_RANDOM = random.Random()


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    base: float
    cap: float
    exponent_cap: int = 16
    jitter: Literal["equal", "full", "none"] = "equal"
    max_attempts: int | None = None

    def delay(
        self, attempt: int, rng: random.Random | None = None, not_before: float = 0.0
    ) -> float:
        d = min(self.cap, self.base * 2.0 ** min(max(0, attempt - 1), self.exponent_cap))
        r = rng or _RANDOM
        if self.jitter == "equal":
            d = d / 2 + r.uniform(0, d / 2)
        elif self.jitter == "full":
            d = r.uniform(0, d)
        return max(float(d), not_before)

    def exhausted(self, attempts: int) -> bool:
        """No attempt is left after ``attempts`` attempts."""
        return self.max_attempts is not None and attempts >= self.max_attempts
