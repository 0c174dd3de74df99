"""The background replayer on a fake clock: backoff by the policy, resume
when the lake is back, and serve as the lake circuit's probe."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from prometheus_client import CollectorRegistry

from estat.clock import FakeClock
from estat.dlq.replayer import Replayer
from estat.ops.metrics import Metrics
from estat.pipeline.gate import LakeGate
from tests.dlq.test_dlq import ERR, batch, make
from tests.fakes import MemorySink


async def until(cond, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    """Bounded by real time, not by a number of yields: the DLQ's reads run
    on a thread, which a loaded machine may not schedule within N yields
    (the clock the replayer waits on is fake, so nothing waits for real)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("condition never held")


async def test_backs_off_while_the_lake_fails_then_replays_everything(tmp_path: Path) -> None:
    clock = FakeClock()
    dlq, _ = make(tmp_path, clock)
    await dlq.start()
    for i in range(3):
        await dlq.spill(batch(f"raw/{i}", range(i, i + 1)), ERR, 3)
    sink = MemorySink()
    sink.fail(3)
    r = Replayer(dlq, sink, live_busy=lambda: False, clock=clock)
    await r.start(lambda name, coro: asyncio.create_task(coro, name=name))
    await until(lambda: len(sink.objects) == 3)
    await r.stop()
    # three failures: 0.5 + 1 + 2 s of backoff on the clock, no real waiting
    assert clock.slept >= 3.5
    assert sorted(sink.objects) == ["raw/0", "raw/1", "raw/2"]


async def test_a_replay_is_the_probe_of_an_open_lake_circuit(tmp_path: Path) -> None:
    clock = FakeClock()
    dlq, _ = make(tmp_path, clock)
    await dlq.start()
    await dlq.spill(batch("raw/p", range(3)), ERR, 3)
    gate = LakeGate(
        threshold=1, probe_interval=5, max_probe_interval=5, clock=clock,
        metrics=Metrics(CollectorRegistry()),
    )  # fmt: skip
    gate.upload_failed(ERR)  # the live uploads opened the circuit
    assert gate.breaker.state == "open"
    sink = MemorySink()
    r = Replayer(dlq, sink, live_busy=lambda: False, lake=gate, clock=clock)
    await r.start(lambda name, coro: asyncio.create_task(coro, name=name))
    await until(lambda: "raw/p" in sink.objects)
    await r.stop()
    assert str(gate.breaker.state) == "closed"  # the replay was the probe, and it succeeded
    assert clock.slept >= 5  # not before the probe interval
    assert sink.attempts == ["raw/p"]


class _StuckClock(FakeClock):
    """A clock whose sleeps never end: a replayer that waits on it stops
    only because it was woken."""

    async def sleep(self, seconds: float) -> None:
        await asyncio.Event().wait()


class _SlowDlq:
    """A DLQ whose replay runs until released, then finds nothing."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def replay_one(self, sink: object) -> str:
        self.entered.set()
        await self.release.wait()
        return "empty"


async def test_a_stop_that_comes_during_a_replay_is_not_missed() -> None:
    # The stop arrives while a replay runs; the replayer must not then go
    # to sleep for its idle interval (which used to hold every shutdown ~1 s).
    dlq = _SlowDlq()
    r = Replayer(dlq, MemorySink(), live_busy=lambda: False, clock=_StuckClock())  # type: ignore[arg-type]
    await r.start(lambda name, coro: asyncio.create_task(coro, name=name))
    await asyncio.wait_for(dlq.entered.wait(), 10)
    r.close()
    dlq.release.set()
    await until(lambda: r._task is not None and r._task.done())
    assert r._task is not None
    assert r._task.exception() is None
