"""A circuit breaker on the injected clock, for any destination.

States::

    closed ──(threshold consecutive failures)──► open
    open ──(open time passed; the next caller is the probe)──► half_open
    half_open ──(probe succeeds)──► closed        (open time back to its base)
    half_open ──(probe fails)──► open             (open time doubled, up to its cap)

``allow()`` says whether the caller may try the destination now: always
while closed; while open, only once the open time has passed, and then to
exactly one caller (the probe) until it reports. Callers report every
attempt they were allowed with ``success()`` or ``failure()``; a probe that
could not finish (cancelled) calls ``abandon()`` so the next caller probes.
A success reported in any state closes the breaker (the destination
answered); a failure reported while open (an attempt that began before
the breaker opened) changes nothing.

``threshold=0`` disables the breaker: ``allow()`` is always true.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from estat.clock import Clock

State = Literal["closed", "open", "half_open"]


class CircuitBreaker:
    def __init__(
        self,
        *,
        threshold: int,
        open_for: float,
        max_open_for: float,
        clock: Clock,
        on_change: Callable[[State], None] | None = None,
    ) -> None:
        self.threshold = threshold
        self.base_open_for = open_for
        self.max_open_for = max(open_for, max_open_for)
        self.open_for = open_for
        self._clock = clock
        self._on_change = on_change
        self.state: State = "closed"
        self.failures = 0  # consecutive, while closed
        self.opened_until = 0.0

    def _set(self, state: State) -> None:
        if state != self.state:
            self.state = state
            if self._on_change is not None:
                self._on_change(state)

    def allow(self) -> bool:
        if self.state == "closed":
            return True
        if self.state == "open" and self._clock.monotonic() >= self.opened_until:
            self._set("half_open")
            return True
        return False

    def success(self) -> None:
        self.failures = 0
        self.open_for = self.base_open_for
        self._set("closed")

    def failure(self) -> None:
        if self.state == "half_open":
            self.open_for = min(self.max_open_for, self.open_for * 2)
            self._open()
        elif self.state == "closed" and self.threshold > 0:
            self.failures += 1
            if self.failures >= self.threshold:
                self._open()

    def abandon(self) -> None:
        """The probe did not finish: let the next caller probe at once."""
        if self.state == "half_open":
            self.opened_until = self._clock.monotonic()
            self._set("open")

    def retry_in(self) -> float:
        """Seconds until a probe is allowed (0 when closed or due)."""
        if self.state == "closed":
            return 0.0
        return max(0.0, self.opened_until - self._clock.monotonic())

    def _open(self) -> None:
        self.failures = 0
        self.opened_until = self._clock.monotonic() + self.open_for
        self._set("open")
