"""The circuit breaker against a model (hypothesis), on a fake clock."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from estat.circuit import CircuitBreaker
from estat.clock import FakeClock


def breaker(clock: FakeClock, threshold: int = 3) -> tuple[CircuitBreaker, list[str]]:
    seen: list[str] = []
    b = CircuitBreaker(
        threshold=threshold, open_for=5, max_open_for=40, clock=clock, on_change=seen.append
    )
    return b, seen


def test_opens_after_threshold_probes_once_and_doubles_to_the_cap() -> None:
    clock = FakeClock()
    b, seen = breaker(clock)
    for _ in range(2):
        assert b.allow()
        b.failure()
    assert str(b.state) == "closed"
    b.success()  # a success resets the count
    for _ in range(3):
        assert b.allow()
        b.failure()
    assert str(b.state) == "open"
    assert seen == ["open"]
    assert not b.allow()
    clock.advance(5)
    assert b.allow()  # the probe
    assert str(b.state) == "half_open"
    assert not b.allow()  # only one probe at a time
    b.failure()
    assert str(b.state) == "open"
    assert b.retry_in() == 10
    for expected in (20, 40, 40):
        clock.advance(b.retry_in())
        assert b.allow()
        b.failure()
        assert b.retry_in() == expected
    clock.advance(40)
    assert b.allow()
    b.success()
    assert str(b.state) == "closed"
    assert b.open_for == 5
    assert seen[-1] == "closed"


def test_an_abandoned_probe_lets_the_next_caller_probe() -> None:
    clock = FakeClock()
    b, _ = breaker(clock, threshold=1)
    b.failure()
    clock.advance(5)
    assert b.allow()
    b.abandon()
    assert str(b.state) == "open"
    assert b.allow()
    assert str(b.state) == "half_open"


def test_threshold_zero_never_opens() -> None:
    b, _ = breaker(FakeClock(), threshold=0)
    for _ in range(100):
        b.failure()
    assert b.allow()
    assert str(b.state) == "closed"


class Model:
    """The breaker as the spec states it (threshold 3, open 5 s doubling to
    40 s; a probe's lease, when there is one), written independently of
    ``estat.circuit``: the expectation both machines are tested against."""

    def __init__(self, probe_lease: float = math.inf) -> None:
        self.state, self.failures, self.open_for = "closed", 0, 5.0
        self.until, self.probe_until, self.probe_lease = 0.0, math.inf, probe_lease

    def allow(self, now: float) -> bool:
        due = (self.state == "open" and now >= self.until) or (
            self.state == "half_open" and now >= self.probe_until
        )
        if due:
            self.state, self.probe_until = "half_open", now + self.probe_lease
        return self.state == "closed" or due

    def success(self) -> None:
        self.state, self.failures, self.open_for = "closed", 0, 5.0

    def failure(self, now: float) -> None:
        if self.state == "half_open":
            self.open_for = min(40.0, self.open_for * 2)
            self.state, self.until, self.failures = "open", now + self.open_for, 0
        elif self.state == "closed":
            self.failures += 1
            if self.failures >= 3:
                self.state, self.until, self.failures = "open", now + self.open_for, 0

    def abandon(self, now: float) -> None:
        if self.state == "half_open":
            self.state, self.until = "open", now


@given(
    st.lists(
        st.sampled_from(["allow", "success", "failure", "abandon", "tick", "wait"]), max_size=60
    )
)
def test_against_a_model(ops: list[str]) -> None:
    clock = FakeClock()
    b, _ = breaker(clock)
    model = Model()
    for op in ops:
        now = clock.monotonic()
        if op == "allow":
            assert b.allow() == model.allow(now)
        elif op == "success":
            b.success()
            model.success()
        elif op == "failure":
            b.failure()
            model.failure(now)
        elif op == "abandon":
            b.abandon()
            model.abandon(now)
        else:
            clock.advance(1 if op == "tick" else 10)
        assert str(b.state) == model.state
