"""Which long-running workers an operator has paused (``relay``, ``store``,
``dlq-replayer``). The state lives in the database (``estat_worker_state``)
and every process follows it (``admin/workers.py`` polls it); a paused
worker keeps its backlog where it is (the outbox, the bus, the DLQ) and
takes nothing new until it is resumed."""

from __future__ import annotations

import asyncio
import contextlib

WORKERS = ("relay", "store", "dispatcher", "dlq-replayer", "retention")


class Pauses:
    def __init__(self) -> None:
        self._paused: set[str] = set()
        self._changed = asyncio.Event()

    def paused(self, name: str) -> bool:
        return name in self._paused

    def set(self, name: str, paused: bool) -> bool:
        """Record a state; True when it changed."""
        if paused == (name in self._paused):
            return False
        if paused:
            self._paused.add(name)
        else:
            self._paused.discard(name)
        self._changed.set()
        self._changed = asyncio.Event()
        return True

    def interrupt(self) -> None:
        """Wake every waiter without a change (a stage that is stopping)."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_change(self, timeout: float) -> None:
        """Until any state changes, or ``timeout``."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)
