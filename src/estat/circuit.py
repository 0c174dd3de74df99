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

The transitions are pure functions of a ``CircuitState`` (``Circuit``), so
the same machine runs in memory (``CircuitBreaker``, the lake gate) and in
the database, shared by several processes (``estat.store.circuit``: the
dispatcher), where a probe also has a lease: a half-open circuit whose
probe did not report within it lets the next caller probe.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

from estat.clock import Clock

State = Literal["closed", "open", "half_open"]


@dataclass(frozen=True, slots=True)
class CircuitState:
    state: State = "closed"
    failures: int = 0  # consecutive, while closed
    opened_until: float = 0.0
    open_for: float = 0.0  # the current open time (0: the base)
    probe_until: float = math.inf  # half-open: the probe's lease


@dataclass(frozen=True, slots=True)
class Circuit:
    """The transitions; ``now`` is any clock the callers share."""

    threshold: int
    open_for: float
    max_open_for: float
    probe_lease: float = math.inf

    def allow(self, s: CircuitState, now: float) -> tuple[bool, CircuitState]:
        if s.state == "closed":
            return True, s
        if (s.state == "open" and now >= s.opened_until) or (
            s.state == "half_open" and now >= s.probe_until
        ):
            return True, replace(s, state="half_open", probe_until=now + self.probe_lease)
        return False, s

    def success(self, s: CircuitState) -> CircuitState:
        return CircuitState()

    def failure(self, s: CircuitState, now: float) -> CircuitState:
        if s.state == "half_open":
            return self._open(s, now, min(self.max_open_for, self.current(s) * 2))
        if s.state == "closed" and self.threshold > 0:
            if s.failures + 1 >= self.threshold:
                return self._open(s, now, self.current(s))
            return replace(s, failures=s.failures + 1)
        return s

    def abandon(self, s: CircuitState, now: float) -> CircuitState:
        if s.state == "half_open":
            return replace(s, state="open", opened_until=now, probe_until=math.inf)
        return s

    def current(self, s: CircuitState) -> float:
        return s.open_for or self.open_for

    @staticmethod
    def retry_in(s: CircuitState, now: float) -> float:
        """Seconds until a probe is allowed (0 when closed or due)."""
        if s.state == "closed":
            return 0.0
        if s.state == "half_open":
            return max(0.0, s.probe_until - now) if math.isfinite(s.probe_until) else 0.0
        return max(0.0, s.opened_until - now)

    def _open(self, s: CircuitState, now: float, open_for: float) -> CircuitState:
        return CircuitState("open", 0, now + open_for, open_for)


class CircuitBreaker:
    """The machine in memory, on the clock's monotonic time."""

    def __init__(
        self,
        *,
        threshold: int,
        open_for: float,
        max_open_for: float,
        clock: Clock,
        on_change: Callable[[State], None] | None = None,
    ) -> None:
        self.circuit = Circuit(threshold, open_for, max(open_for, max_open_for))
        self.threshold = threshold
        self._clock = clock
        self._on_change = on_change
        self.s = CircuitState()

    @property
    def state(self) -> State:
        return self.s.state

    @property
    def open_for(self) -> float:
        return self.circuit.current(self.s)

    def _set(self, s: CircuitState) -> None:
        old, self.s = self.s.state, s
        if s.state != old and self._on_change is not None:
            self._on_change(s.state)

    def allow(self) -> bool:
        ok, s = self.circuit.allow(self.s, self._clock.monotonic())
        self._set(s)
        return ok

    def success(self) -> None:
        self._set(self.circuit.success(self.s))

    def failure(self) -> None:
        self._set(self.circuit.failure(self.s, self._clock.monotonic()))

    def abandon(self) -> None:
        """The probe did not finish: let the next caller probe at once."""
        self._set(self.circuit.abandon(self.s, self._clock.monotonic()))

    def retry_in(self) -> float:
        """Seconds until a probe is allowed (0 when closed or due)."""
        return self.circuit.retry_in(self.s, self._clock.monotonic())
