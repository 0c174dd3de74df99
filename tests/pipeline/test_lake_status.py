"""What ``/ready`` says of the lake as uploads fail and recover: ``retrying``
while the latest attempt failed, ``failing`` once the circuit opened, ``ok``
after an upload succeeded (the start-up check's verdict no longer)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from estat.errors import RetryableDeliveryError
from tests.fakes import MemorySink
from tests.ingest.helpers import close_all, start_app


async def until(cond: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)


async def test_the_lake_status_follows_the_uploads(tmp_path: Path) -> None:
    sink = MemorySink()
    sink.always_fail = RetryableDeliveryError("refused", error_class="connection_refused")
    app = await start_app(
        tmp_path, sink, flush_interval="50ms", s3_app_retries="0", lake_failure_threshold="3",
        lake_probe_interval="200ms",
    )  # fmt: skip
    assert app.address is not None
    url = f"http://{app.address[0]}:{app.address[1]}/collect"
    async with httpx.AsyncClient() as c:
        assert (await c.post(url, content=b'{"n":1}')).status_code == 200
        await until(lambda: app.lake_status() != "ok")
        assert app.lake_status() == "retrying: connection_refused"  # one failure: still closed
        for i in range(5):  # more failed batches: the circuit opens
            assert (await c.post(url, content=b'{"n":%d}' % i)).status_code == 200
            await asyncio.sleep(0.1)
        await until(lambda: app.lake_status() == "failing: connection_refused")
        sink.always_fail = None  # the lake is back: a probe succeeds
        await until(lambda: app.lake_status() == "ok")
    await close_all()
    await app.shutdown()
