"""Answers computed later (a route that awaits, such as the event API
waiting for room in the publish queue), kept in request order.

A route calls ``HttpConnection.run_deferred(work)``; ``work`` gets a
``Deferred`` and calls its ``respond`` once. Answers still leave in the
order the requests came: a pipelined request answered at once waits
behind an earlier one still being worked on, and a connection with
``MAX_PENDING`` answers outstanding stops being read until half of them
have left. An exception from ``work`` becomes a 503 (``Overloaded``) or a
500, never a request left without an answer.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Final

from estat.errors import Overloaded
from estat.ingest.answers import JSON_HDR, count_overloaded
from estat.ops.logging import get_logger

if TYPE_CHECKING:
    from estat.ingest.http import HttpConnection

log = get_logger("estat.http")

_perf: Final = time.perf_counter

MAX_PENDING: Final = 32  # answers waiting on async work before the connection stops being read


class Deferred:
    """An answer computed later; captures the request's answer context."""

    __slots__ = ("conn", "data", "keep", "keep_alive", "method", "mount", "started")

    def __init__(self, conn: HttpConnection) -> None:
        self.conn = conn
        self.mount = conn.mount
        self.keep_alive = conn.keep_alive
        self.method = conn.method
        self.started = conn.started
        self.data: bytes | None = None
        self.keep = True

    def respond(
        self, status: int, body: bytes = b"", headers: bytes = b"", *, close: bool = False
    ) -> None:
        if self.data is not None:
            return
        c = self.conn
        counts = self.mount.counts
        counts[status] = counts.get(status, 0) + 1
        self.mount.latency.observe(_perf() - self.started)
        self.keep = self.keep_alive and not close and not c.server.draining
        self.data = c.server.answers.render(status, body, headers, self.keep, self.method)
        flush(c)


def queue_answer(c: HttpConnection, data: bytes, keep: bool) -> None:
    """An answer ready now that must wait behind an earlier deferred one."""
    d = Deferred(c)
    d.data, d.keep = data, keep
    assert c.pending is not None
    c.pending.append(d)
    flush(c)


def run_deferred(c: HttpConnection, work: Callable[[Deferred], Awaitable[None]]) -> None:
    d = Deferred(c)
    if c.pending is None:
        c.pending = deque()
    c.pending.append(d)
    c.in_request = False
    if len(c.pending) >= MAX_PENDING and c.transport is not None:
        c.reading_paused = True
        c.transport.pause_reading()
    task = asyncio.get_running_loop().create_task(_guard(c, work, d))
    c.server.tasks.add(task)
    task.add_done_callback(c.server.tasks.discard)


async def _guard(
    c: HttpConnection, work: Callable[[Deferred], Awaitable[None]], d: Deferred
) -> None:
    route = d.mount.route
    name = route.name if route is not None else "other"
    try:
        await work(d)
    except Overloaded as e:
        assert route is not None
        count_overloaded(c.server.metrics, name, e)
        d.respond(
            503,
            route.unavailable_body,
            b"retry-after: %d\r\n" % e.retry_after + route.unavailable_headers,
        )
    except Exception:
        log.exception("handler failed", route=name)
        d.respond(500, b'{"code":"INTERNAL","message":"internal error"}', JSON_HDR, close=True)
    if d.data is None:
        d.respond(500, b'{"code":"INTERNAL","message":"no answer"}', JSON_HDR, close=True)


def flush(c: HttpConnection) -> None:
    """Write the answers that are ready, in order, up to the first still due."""
    pending = c.pending
    t = c.transport
    while pending and (data := pending[0].data) is not None:
        d = pending.popleft()
        if t is None or c.closing:
            continue
        t.write(data)
        c.answered += 1
        if not d.keep:
            c.close()
    if not pending:
        c.pending = None
    if c.reading_paused and (not pending or len(pending) < MAX_PENDING // 2):
        c.reading_paused = False
        if t is not None and not c.closing:
            t.resume_reading()
