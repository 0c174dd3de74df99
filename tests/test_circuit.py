"""The circuit breaker against a model (hypothesis), on a fake clock."""

from __future__ import annotations

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


@given(
    st.lists(
        st.sampled_from(["allow", "success", "failure", "abandon", "tick", "wait"]), max_size=60
    )
)
def test_against_a_model(ops: list[str]) -> None:
    clock = FakeClock()
    b, _ = breaker(clock)
    state, failures, open_for, until = "closed", 0, 5.0, 0.0
    for op in ops:
        now = clock.monotonic()
        if op == "allow":
            expect = state == "closed" or (state == "open" and now >= until)
            if state == "open" and now >= until:
                state = "half_open"
            assert b.allow() == expect
        elif op == "success":
            b.success()
            state, failures, open_for = "closed", 0, 5.0
        elif op == "failure":
            b.failure()
            if state == "half_open":
                open_for = min(40.0, open_for * 2)
                state, until, failures = "open", now + open_for, 0
            elif state == "closed":
                failures += 1
                if failures >= 3:
                    state, until, failures = "open", now + open_for, 0
        elif op == "abandon":
            b.abandon()
            if state == "half_open":
                state, until = "open", now
        elif op == "tick":
            clock.advance(1)
        else:
            clock.advance(10)
        assert str(b.state) == state
