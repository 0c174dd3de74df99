"""Per-identity rate limits: a fixed window of ``max_requests`` per ``window``.

Two backends behind one seam. ``MemoryRateLimiter`` keeps counters in the
process (bounded: expired windows are swept, and past ``max_keys`` the
oldest are evicted). ``RedisRateLimiter`` keeps them in Redis with one
atomic script per request, so every replica and worker shares the limit;
when Redis cannot be reached the request is allowed (fail open), counted in
``analytics_rate_limiter_errors_total`` and logged: ingest does not stop
because the limiter is down.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Protocol

from estat.clock import Clock
from estat.ops.logging import Sampler, get_logger
from estat.ops.metrics import Metrics

log = get_logger("estat.ratelimit")


class Decision:
    __slots__ = ("allowed", "retry_after")

    def __init__(self, allowed: bool, retry_after: int = 0) -> None:
        self.allowed = allowed
        self.retry_after = retry_after


ALLOW = Decision(True)


class RateLimiter(Protocol):
    """``hit(key)`` counts one request for ``key`` and says whether it is allowed.

    ``is_async`` tells the caller to use ``hit_async`` (a network backend).
    Neither raises: a backend failure allows the request.
    """

    is_async: bool

    def hit(self, key: str) -> Decision: ...

    async def hit_async(self, key: str) -> Decision: ...

    async def close(self) -> None: ...


class MemoryRateLimiter:
    """Fixed windows in an ``OrderedDict`` ordered by window start: expiring
    and evicting take from its front, so every request costs O(1) whatever
    the number of live identities (a scan per new identity pinned a core
    once 100,000 were live)."""

    is_async = False

    def __init__(
        self, max_requests: int, window: float, clock: Clock, max_keys: int = 100_000
    ) -> None:
        self.max_requests = max_requests
        self.window = window
        self._clock = clock
        self.max_keys = max_keys
        self._windows: OrderedDict[str, list[float]] = OrderedDict()  # key -> [start, count]

    def hit(self, key: str) -> Decision:
        now = self._clock.monotonic()
        ws = self._windows
        w = ws.get(key)
        if w is None or now - w[0] >= self.window:
            if w is None:
                self._sweep(now)
                ws[key] = [now, 1]
            else:  # a new window: to the back, where the newest windows are
                w[0], w[1] = now, 1
                ws.move_to_end(key)
            return ALLOW
        w[1] += 1
        if w[1] <= self.max_requests:
            return ALLOW
        return Decision(False, max(1, math.ceil(w[0] + self.window - now)))

    def _sweep(self, now: float) -> None:
        """Drop expired windows from the front; past ``max_keys``, the oldest."""
        ws = self._windows
        window = self.window
        while ws:
            first = next(iter(ws.values()))
            if now - first[0] < window:
                break
            ws.popitem(last=False)
        while len(ws) >= self.max_keys:
            ws.popitem(last=False)

    async def hit_async(self, key: str) -> Decision:
        return self.hit(key)

    async def close(self) -> None:
        return None

    def __len__(self) -> int:
        return len(self._windows)


_SCRIPT = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[1]); ttl = tonumber(ARGV[1]) end
return {n, ttl}
"""


class RedisRateLimiter:
    is_async = True

    def __init__(
        self,
        url: str,
        max_requests: int,
        window: float,
        metrics: Metrics,
        *,
        timeout: float = 0.25,
        prefix: str = "estat:rl:",
    ) -> None:
        import redis.asyncio as aioredis

        self.max_requests = max_requests
        self.window_ms = int(window * 1000)
        self._m = metrics
        self._prefix = prefix
        self._client: Any = aioredis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout
        )
        self._script: Any = self._client.register_script(_SCRIPT)
        self._log_sample = Sampler(100)

    def hit(self, key: str) -> Decision:
        raise TypeError("RedisRateLimiter is asynchronous: use hit_async")

    async def hit_async(self, key: str) -> Decision:
        try:
            n, ttl = await self._script(keys=[self._prefix + key], args=[self.window_ms])
        except Exception as e:
            self._m.rate_limiter_errors.labels("redis").inc()
            if self._log_sample():
                log.warning("rate limiter unavailable: allowing", error=type(e).__name__)
            return ALLOW
        if int(n) <= self.max_requests:
            return ALLOW
        return Decision(False, max(1, math.ceil(int(ttl) / 1000)))

    async def close(self) -> None:
        await self._client.aclose()


# -- one limit for every worker of a server, without Redis -------------------------
#
# ``estat serve --workers N`` runs N processes; in-process windows would let a
# client through N times the limit. The supervisor hosts one
# ``MemoryRateLimiter`` behind a Unix socket (``serve_shared_limiter``, a thread
# of the parent) and every worker asks it (``SharedRateLimiter``): one short
# round trip per client-event request, the configured limit is the server's.
# Protocol: the worker writes ``<key>\n``; the answer is ``0\n`` (allowed) or
# ``<retry-after seconds>\n``. Like Redis, a limiter that cannot be reached
# allows the request (counted, logged).


def _wire_key(key: str) -> bytes:
    return key.replace("\n", " ").replace("\r", " ").encode("utf-8", "replace") + b"\n"


class SharedRateLimiter:
    is_async = True

    def __init__(self, path: str, metrics: Metrics, *, timeout: float = 0.25) -> None:
        import asyncio

        self._path = path
        self._m = metrics
        self._timeout = timeout
        self._lock = asyncio.Lock()  # one question in flight per worker: answers in order
        self._reader: Any = None
        self._writer: Any = None
        self._log_sample = Sampler(100)

    def hit(self, key: str) -> Decision:
        raise TypeError("SharedRateLimiter is asynchronous: use hit_async")

    async def hit_async(self, key: str) -> Decision:
        import asyncio

        async with self._lock:
            try:
                if self._writer is None:
                    self._reader, self._writer = await asyncio.wait_for(
                        asyncio.open_unix_connection(self._path), self._timeout
                    )
                self._writer.write(_wire_key(key))
                line = await asyncio.wait_for(self._reader.readline(), self._timeout)
                if not line:
                    raise ConnectionError("limiter closed the connection")
                retry_after = int(line)
            except Exception as e:
                self._drop()
                self._m.rate_limiter_errors.labels("shared").inc()
                if self._log_sample():
                    log.warning("rate limiter unavailable: allowing", error=type(e).__name__)
                return ALLOW
        return ALLOW if retry_after == 0 else Decision(False, retry_after)

    def _drop(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None

    async def close(self) -> None:
        self._drop()


def serve_shared_limiter(path: str, max_requests: int, window: float, clock: Clock) -> Any:
    """Serve one ``MemoryRateLimiter`` on the Unix socket ``path`` from a daemon
    thread (the supervisor's); returns the thread."""
    import asyncio
    import threading

    limiter = MemoryRateLimiter(max_requests, window, clock)
    ready = threading.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                d = limiter.hit(line[:-1].decode("utf-8", "replace"))
                writer.write(b"0\n" if d.allowed else b"%d\n" % max(1, d.retry_after))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_unix_server(handle, path)
        ready.set()
        async with server:
            await server.serve_forever()

    thread = threading.Thread(
        target=lambda: asyncio.run(main()), name="estat-rate-limits", daemon=True
    )
    thread.start()
    if not ready.wait(10):
        raise RuntimeError("the shared rate limiter did not start")
    return thread
