"""The dispatcher's circuit breaker per target, shared through the
database (``estat_dispatch_circuit``), so several dispatcher processes
open, wait and probe together: the machine is ``estat.circuit.Circuit``
on the clock's wall time; every transition is a compare-and-set on the
row's ``version`` (read, apply, ``UPDATE ... WHERE version = v``; another
process's write in between means read and apply again), so one caller
wins the probe. A probe has a lease (``probe_lease``): a probe whose
process died lets the next caller probe once it has passed.

Every method is blocking (run it with ``Database.run``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

from sqlalchemy import select, update
from sqlalchemy.engine import Connection

from estat.circuit import Circuit, CircuitState, State
from estat.clock import Clock
from estat.store.db import Database
from estat.store.schema import estat_dispatch_circuit as C

T = TypeVar("T")

#: attempts of a compare-and-set before giving up (only under heavy contention)
CAS_TRIES = 20


def _state(row: Any) -> CircuitState:
    probe = row.probe_until
    return CircuitState(
        cast(State, row.state),
        int(row.failures),
        float(row.opened_until),
        float(row.open_for),
        math.inf if probe is None else float(probe),
    )


def _values(s: CircuitState) -> dict[str, Any]:
    return {
        "state": s.state,
        "failures": s.failures,
        "opened_until": s.opened_until,
        "open_for": s.open_for,
        "probe_until": None if math.isinf(s.probe_until) else s.probe_until,
    }


class SharedCircuit:
    def __init__(
        self,
        db: Database,
        target: str,
        circuit: Circuit,
        clock: Clock,
        on_change: Callable[[State, State], None] | None = None,
        *,
        fresh_for: float = 0.0,
    ) -> None:
        #: while this process saw the circuit closed less than this long
        #: ago, ``allow`` answers from that view without a query (another
        #: process's opening is seen at most this late)
        self.fresh_for = fresh_for
        self._seen_at = -math.inf
        self.db = db
        self.target = target
        self.circuit = circuit
        self._clock = clock
        self._on_change = on_change  # (old, new), by the process that made it
        #: the state as last read or written by this process
        self.last = CircuitState()

    def _read(self, conn: Connection) -> tuple[CircuitState, int]:
        row = conn.execute(select(C).where(C.c.target == self.target)).first()
        if row is None:
            return CircuitState(), -1
        return _state(row), int(row.version)

    def _write(self, conn: Connection, s: CircuitState, version: int) -> bool:
        now = datetime.fromtimestamp(self._clock.time(), UTC)
        if version < 0:
            created = conn.execute(
                self.db.insert(C)
                .values(target=self.target, version=0, updated_at=now, **_values(s))
                .on_conflict_do_nothing()
                .returning(C.c.target)  # rowcount is not reliable here (psycopg: -1)
            ).first()
            return created is not None  # None: another process created it first
        res = conn.execute(
            update(C)
            .where(C.c.target == self.target, C.c.version == version)
            .values(version=version + 1, updated_at=now, **_values(s))
        )
        return res.rowcount == 1

    def _transition(self, fn: Callable[[CircuitState, float], tuple[T, CircuitState]]) -> T:
        for _ in range(CAS_TRIES):
            with self.db.engine.begin() as conn:
                old, version = self._read(conn)
                result, new = fn(old, self._clock.time())
                if new == old or self._write(conn, new, version):
                    break
        else:
            raise RuntimeError(f"circuit {self.target}: too much contention")
        self.last = new
        self._seen_at = self._clock.monotonic()
        if new.state != old.state and self._on_change is not None:
            self._on_change(old.state, new.state)
        return result

    def read(self) -> CircuitState:
        with self.db.engine.connect() as conn:
            self.last = self._read(conn)[0]
        self._seen_at = self._clock.monotonic()
        return self.last

    def fresh(self) -> bool:
        """Closed as this process saw it less than ``fresh_for`` ago: a
        caller may go ahead without asking the database (no I/O)."""
        return self.last.state == "closed" and (
            self._clock.monotonic() - self._seen_at < self.fresh_for
        )

    def allow(self) -> bool:
        if self.fresh():
            return True
        return self._transition(self.circuit.allow)

    def success(self) -> None:
        self._transition(lambda s, now: (None, self.circuit.success(s)))

    def failure(self) -> None:
        self._transition(lambda s, now: (None, self.circuit.failure(s, now)))

    def abandon(self) -> None:
        self._transition(lambda s, now: (None, self.circuit.abandon(s, now)))

    def reset(self) -> CircuitState:
        """An operator's reset: closed, open time back to its base."""
        self._transition(lambda s, now: (None, CircuitState()))
        return self.last

    def retry_in(self) -> float:
        """Seconds until a probe is allowed, as last seen (0 when closed or due)."""
        return self.circuit.retry_in(self.last, self._clock.time())


def circuits(db: Database) -> dict[str, CircuitState]:
    """Every target's stored state (a target never opened has no row)."""
    with db.engine.connect() as conn:
        return {str(r.target): _state(r) for r in conn.execute(select(C))}
