"""Fakes for tests: sinks that fail on command, a spill that records."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from sqlalchemy.exc import OperationalError

from estat.errors import DeliveryError, PermanentDeliveryError, RetryableDeliveryError


class MemorySink:
    """An in-memory lake. ``fail_next`` queues errors to raise before storing."""

    description = "memory://"

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.metadata: dict[str, Mapping[str, str]] = {}
        self.attempts: list[str] = []
        self.fail_next: list[DeliveryError] = []
        self.always_fail: DeliveryError | None = None
        self.delay = 0.0

    def fail(self, n: int, *, permanent: bool = False) -> None:
        for _ in range(n):
            self.fail_next.append(
                PermanentDeliveryError("denied", error_class="access_denied")
                if permanent
                else RetryableDeliveryError("boom", error_class="connection")
            )

    async def put(self, key: str, data: bytes, metadata: Mapping[str, str]) -> None:
        self.attempts.append(key)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.always_fail is not None:
            raise self.always_fail
        if self.fail_next:
            raise self.fail_next.pop(0)
        self.objects[key] = bytes(data)
        self.metadata[key] = dict(metadata)

    async def close(self) -> None:
        return None


def slow_once(real: Callable[..., Awaitable[Any]], seconds: float) -> Callable[..., Any]:
    """``real`` (a coroutine function), its first call ``seconds`` late: a
    send or publish slower than a lease."""
    calls = 0

    async def slow(*a: Any, **kw: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            await asyncio.sleep(seconds)
        return await real(*a, **kw)

    return slow


def lost_once(real: Callable[..., Any]) -> Callable[..., Any]:
    """``real``, except that its first call fails as a database connection
    lost in the middle of the statement does."""
    calls = 0

    def flaky(*a: Any, **kw: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OperationalError("UPDATE", {}, Exception("connection lost"))
        return real(*a, **kw)

    return flaky
