"""The runtime: stages start layer by layer and stop in reverse, a stage
that cannot start leaves nothing running, and losses are summed."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry

from estat.clock import FakeClock
from estat.ops.metrics import Metrics
from estat.ops.tasks import Supervisor
from estat.runtime import Runtime
from estat.stage import Deadline, Spawn


class Recorder:
    def __init__(self, name: str, log: list[str], lost: int = 0, fail: bool = False) -> None:
        self.name, self.log, self.lost, self.fail = name, log, lost, fail
        self.task: asyncio.Task[None] | None = None

    async def start(self, spawn: Spawn) -> None:
        if self.fail:
            raise OSError("address in use")
        self.log.append(f"start {self.name}")
        self.task = spawn(self.name, asyncio.Event().wait())  # type: ignore[arg-type]

    def close(self) -> None:
        self.log.append(f"close {self.name}")

    async def join(self, deadline: Deadline) -> int:
        self.log.append(f"join {self.name}")
        assert self.task is not None
        self.task.cancel()
        return self.lost


def runtime(layers: list[list[Recorder]]) -> tuple[Runtime, list[str]]:
    failures: list[str] = []
    sup = Supervisor(Metrics(CollectorRegistry()), failures.append)
    return Runtime(layers, sup, FakeClock()), failures


async def test_start_in_order_stop_in_reverse_and_sum_the_losses() -> None:
    log: list[str] = []
    a, b, c = Recorder("a", log), Recorder("b", log, lost=2), Recorder("c", log, lost=3)
    rt, failures = runtime([[a], [b, c]])
    await rt.start()
    assert log == ["start a", "start b", "start c"]
    log.clear()
    assert await rt.stop(Deadline.after(5, FakeClock())) == 5
    assert log == ["close b", "close c", "join b", "join c", "close a", "join a"]
    await asyncio.sleep(0)
    assert failures == []  # tasks ended by the stop are not failures


async def test_a_stage_that_cannot_start_stops_those_that_did() -> None:
    log: list[str] = []
    rt, failures = runtime([[Recorder("a", log)], [Recorder("listener", log, fail=True)]])
    with pytest.raises(OSError, match="address in use"):
        await rt.start()
    assert log == ["start a", "close a", "join a"]
    await asyncio.sleep(0)
    assert failures == []
