"""The dispatcher's circuit breaker shared through the database: two
dispatchers' views of one target behave as one breaker (against the same
model as the in-memory one, hypothesis, on a fake clock), one of them wins
the probe, a probe whose process died is taken over after its lease."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from estat.circuit import Circuit
from estat.clock import FakeClock
from estat.store.circuit import SharedCircuit, circuits
from estat.store.db import Database
from tests.test_circuit import Model

CIRCUIT = Circuit(threshold=3, open_for=5, max_open_for=40, probe_lease=30)


@pytest.fixture(scope="module")
def shared_db(tmp_path_factory: pytest.TempPathFactory) -> Database:
    d = Database(f"sqlite:///{tmp_path_factory.mktemp('circuit') / 'c.db'}")
    d.upgrade()
    return d


def pair(
    db: Database, clock: FakeClock, target: str
) -> tuple[SharedCircuit, SharedCircuit, list[tuple[str, str]]]:
    seen: list[tuple[str, str]] = []
    a = SharedCircuit(db, target, CIRCUIT, clock, lambda o, n: seen.append((o, n)))
    b = SharedCircuit(db, target, CIRCUIT, clock, lambda o, n: seen.append((o, n)))
    return a, b, seen


_n = 0


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["allow", "success", "failure", "abandon", "tick", "wait", "lease"]),
            st.booleans(),
        ),
        max_size=40,
    )
)
def test_two_dispatchers_behave_as_one_breaker(
    shared_db: Database, ops: list[tuple[str, bool]]
) -> None:
    global _n
    _n += 1
    clock = FakeClock()
    a, b, seen = pair(shared_db, clock, f"T{_n}")
    model = Model(probe_lease=30)
    transitions = 0
    for op, first in ops:
        c = a if first else b
        now = clock.time()
        before = model.state
        if op == "allow":
            assert c.allow() == model.allow(now)
        elif op == "success":
            c.success()
            model.success()
        elif op == "failure":
            c.failure()
            model.failure(now)
        elif op == "abandon":
            c.abandon()
            model.abandon(now)
        else:
            clock.advance({"tick": 1, "wait": 10, "lease": 31}[op])
        transitions += model.state != before
        assert c.read().state == model.state
        assert (a.read().state, b.read().state) == (model.state, model.state)
    assert len(seen) == transitions  # each transition reported once, by the one that made it


def test_one_of_two_wins_the_probe_and_a_dead_probe_is_taken_over(shared_db: Database) -> None:
    clock = FakeClock()
    a, b, seen = pair(shared_db, clock, "PROBE")
    for _ in range(3):
        assert a.allow()
        b.failure()
    assert not a.allow()
    assert not b.allow()
    assert a.retry_in() == 5
    clock.advance(5)
    assert a.allow()  # the probe
    assert not b.allow()  # only one
    clock.advance(29)
    assert not b.allow()
    clock.advance(1)  # a died with its probe: after the lease, b probes
    assert b.allow()
    b.success()
    assert circuits(shared_db)["PROBE"].state == "closed"
    assert seen == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]


def test_reset_closes_and_forgets_the_open_time(shared_db: Database) -> None:
    clock = FakeClock()
    a, _, _ = pair(shared_db, clock, "RESET")
    for _ in range(3):
        a.failure()
    clock.advance(5)
    a.allow()
    a.failure()  # open for 10 now
    assert circuits(shared_db)["RESET"].open_for == 10
    a.reset()
    s = circuits(shared_db)["RESET"]
    assert (s.state, s.failures, CIRCUIT.current(s)) == ("closed", 0, 5)


def test_postgres_shares_it_too(pg_url: str) -> None:
    db = Database(pg_url)
    db.upgrade()
    clock = FakeClock()
    a, b, _ = pair(db, clock, "PG")
    a.failure()
    assert circuits(db)["PG"].failures == 1  # the row's creation counted once
    for _ in range(2):
        a.failure()
    clock.advance(5)
    assert b.allow()
    assert not a.allow()
    a.success()
    assert b.read().state == "closed"
    db.close()
