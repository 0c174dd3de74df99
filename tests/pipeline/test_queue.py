from __future__ import annotations

import asyncio

import msgspec
import pytest

from estat.errors import Overloaded
from estat.pipeline.queue import EventQueue


def test_full_by_events_raises_overloaded() -> None:
    q = EventQueue(max_events=3, max_bytes=10_000)
    for i in range(3):
        q.put({"i": i})
    with pytest.raises(Overloaded) as e:
        q.put({"i": 3})
    assert e.value.retry_after >= 1
    assert len(q) == 3


def test_full_by_bytes_raises_overloaded() -> None:
    q = EventQueue(max_events=1000, max_bytes=100)
    q.put({"pad": "x" * 120})  # the last record may pass the bound by its own size
    with pytest.raises(Overloaded):
        q.put({"pad": "y"})


def test_closed_queue_refuses() -> None:
    q = EventQueue(10, 10_000)
    q.close()
    with pytest.raises(Overloaded):
        q.put({"a": 1})


def test_take_splits_at_line_boundaries() -> None:
    q = EventQueue(100, 100_000)
    for i in range(10):
        q.put({"i": i})
    chunk, n = q.take(4, 10_000)
    assert n == 4
    assert [msgspec.json.decode(x)["i"] for x in bytes(chunk).splitlines()] == [0, 1, 2, 3]
    line = len(b'{"i":0}\n')
    chunk, n = q.take(100, line * 2)
    assert n == 2
    assert len(q) == 4
    chunk, n = q.take(100, 1)  # one line always moves, even past max_bytes
    assert n == 1
    rest, n = q.take(100, 100_000)
    assert n == 3
    assert [msgspec.json.decode(x)["i"] for x in bytes(rest).splitlines()] == [7, 8, 9]
    assert q.nbytes == 0


async def test_wait_wakes_on_threshold_and_close() -> None:
    q = EventQueue(8, 100_000)  # wake_at = 2
    waiter = asyncio.ensure_future(q.wait(10))
    await asyncio.sleep(0)
    q.put({"a": 1})
    await asyncio.sleep(0)
    assert not waiter.done()
    q.put({"a": 2})
    await asyncio.wait_for(waiter, 1)
    q2 = EventQueue(8, 100_000)
    w2 = asyncio.ensure_future(q2.wait(10))
    await asyncio.sleep(0)
    q2.close()
    await asyncio.wait_for(w2, 1)
