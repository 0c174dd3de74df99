"""The ingest listener's server: its lifecycle (bind, a once-a-second tick
that refreshes the ``Date`` header and enforces deadlines, the drain), the
connection cap, and the folding of per-route answer counts into metrics.
The per-connection protocol is ``estat.ingest.http``; answer rendering is
``estat.ingest.answers``."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

from estat.ingest.answers import Answers
from estat.ingest.http import HttpConnection
from estat.ingest.route import Route
from estat.ops.hist import FastHistogram
from estat.ops.metrics import Metrics


@dataclass(frozen=True, slots=True)
class HttpLimits:
    max_head: int = 16384
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    keepalive_timeout: float = 75.0
    #: open connections at most; above it the oldest idle keep-alive
    #: connection is closed, or the new one when none is idle
    max_connections: int = 10_000


class Mount:
    """A route plus its hot-path statistics (answers by status, latency)."""

    __slots__ = ("counts", "flushed", "handle", "latency", "max_body_digits", "route")

    def __init__(self, route: Route | None, metrics: Metrics) -> None:
        self.route = route
        self.max_body_digits = len(str(route.max_body)) if route is not None else 1
        # the bound method, looked up once instead of per request
        self.handle: Callable[[HttpConnection], None] | None = (
            route.handle if route is not None else None
        )
        self.counts: dict[int, int] = {}
        self.flushed: dict[int, int] = {}
        name = route.name if route is not None else "other"
        self.latency: FastHistogram = metrics.fast_histogram(metrics.http_duration.labels(name))


class HttpServer:
    def __init__(
        self,
        routes: Mapping[bytes, Route],
        *,
        limits: HttpLimits,
        metrics: Metrics,
        log_sample: Callable[[], bool] = lambda: True,
    ) -> None:
        self.mounts = {path: Mount(r, metrics) for path, r in routes.items()}
        self.unknown = Mount(None, metrics)
        self.limits = limits
        self.metrics = metrics
        self.log_sample = log_sample
        # open connections, oldest first (a dict keeps insertion order)
        self.connections: dict[HttpConnection, None] = {}
        self.draining = False
        self.now = time.monotonic()
        self.answers = Answers()
        self._server: asyncio.base_events.Server | None = None
        self._tick_handle: asyncio.TimerHandle | None = None
        self._all_closed: asyncio.Event | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.connections_shed = 0  # closed or refused for the connection cap
        self.too_large = 0  # ingest requests refused 413 by the size limits
        self._too_large_flushed = 0
        self._shed_flushed = 0
        #: told when the listener's own periodic work fails (the supervisor)
        self.on_failure: Callable[[str, BaseException], None] | None = None
        metrics.add_flusher(self._flush)

    def admit(self, c: HttpConnection) -> bool:
        """A new connection: make room under ``max_connections`` by closing
        the oldest idle keep-alive connection; False (close the new one at
        once) when every connection is busy."""
        conns = self.connections
        if len(conns) < self.limits.max_connections:
            conns[c] = None
            return True
        self.connections_shed += 1
        idle = [x for x in conns if not x.busy()]
        if not idle:
            return False
        oldest = min(idle, key=lambda x: x.seen_at)  # ties: the oldest connection
        oldest.close()
        conns.pop(oldest, None)
        conns[c] = None
        return True

    def forget(self, c: HttpConnection) -> None:
        self.connections.pop(c, None)
        if self._all_closed is not None and not self.connections:
            self._all_closed.set()

    def _flush(self) -> None:
        """Fold the per-route answer counts into the metrics.

        ``http_requests_total`` and ``http_responses_total`` are every answer
        by route and status: transport facts. Business outcomes are counted
        where they are decided: accepted events by the routes, bodies too
        large by the connection that refuses them (``too_large``), 503s by
        cause (``count_overloaded``).
        """
        m = self.metrics
        requests = 0
        for mount in (*self.mounts.values(), self.unknown):
            name = mount.route.name if mount.route is not None else "other"
            for status, n in list(mount.counts.items()):
                delta = n - mount.flushed.get(status, 0)
                if not delta:
                    continue
                mount.flushed[status] = n
                m.http_responses.labels(name, str(status)).inc(delta)
                requests += delta
        if requests:
            m.http_requests.inc(requests)
        too_large = self.too_large - self._too_large_flushed
        if too_large:
            m.http_too_large.inc(too_large)
            self._too_large_flushed += too_large
        m.http_connections.set(len(self.connections))
        shed = self.connections_shed - self._shed_flushed
        if shed:
            m.http_connections_shed.inc(shed)
            self._shed_flushed += shed

    # -- lifecycle -----------------------------------------------------------
    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: HttpConnection(self),
            host=host,
            port=port,
            reuse_port=reuse_port,
            backlog=2048,
        )
        self._tick()
        # uvloop's Server.sockets is a list, not the tuple the stubs promise
        sock = cast(Any, self._server).sockets[0]
        addr = sock.getsockname()
        return str(addr[0]), int(addr[1])

    def _tick(self) -> None:
        """Once a second: refresh the Date header and enforce the deadlines.

        The hot path only moves each connection's phase (head, body, idle)
        and its answer count; a connection whose phase has not moved for the
        phase's timeout gets 408 (head or body) or a quiet close (idle).
        """
        loop = asyncio.get_running_loop()
        now = self.now = loop.time()
        # the next tick first: an error below must not end the chain
        self._tick_handle = loop.call_at(now + 1.0, self._tick)
        try:
            self.answers.update_date()
            lim = self.limits
            expired = []
            for c in self.connections:
                state = (c.answered, c.in_head, c.in_request)
                if state != c.seen_state:
                    c.seen_state = state
                    c.seen_at = now
                    continue
                if c.in_head or (c.answered == 0 and not c.in_request and not c.pending):
                    # the head deadline runs from accept: a connection that
                    # never sends a byte is closed after HTTP_HEADER_TIMEOUT
                    limit = lim.header_timeout
                elif c.in_request:
                    limit = lim.body_timeout
                else:
                    limit = lim.keepalive_timeout
                if now - c.seen_at >= limit:
                    expired.append(c)
            for c in expired:
                c.on_deadline()
        except Exception as e:
            if self.on_failure is None:
                raise
            self.on_failure("listener", e)

    async def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()

    async def drain(self, grace: float) -> None:
        """Stop reading new requests: close idle connections now, busy ones
        after their answer; abort what is still open after ``grace`` seconds."""
        self.draining = True
        await self.stop_accepting()
        for c in list(self.connections):
            if not c.busy():
                c.close()
        if self.connections:
            self._all_closed = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_closed.wait(), grace)
        for c in list(self.connections):
            c.abort()
        if self._tick_handle is not None:
            self._tick_handle.cancel()
