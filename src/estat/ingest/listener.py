"""The ingest listener as a stage (``estat.stage``)."""

from __future__ import annotations

import asyncio

from estat.ingest.server import HttpServer
from estat.stage import Deadline, Spawn

#: longest wait for requests in progress when the listener stops
HTTP_DRAIN_GRACE = 2.0


class Listener:
    """The ingest listener as a stage: binds at start (an address in use
    fails the start), stops accepting at close, and at join lets requests in
    progress, deferred answers included, finish within ``HTTP_DRAIN_GRACE``."""

    name = "listener"

    def __init__(
        self, http: HttpServer, host: str, port: int, *, reuse_port: bool, grace: float
    ) -> None:
        self.http = http
        self.host, self.port = host, port
        self.reuse_port = reuse_port
        self.grace = min(HTTP_DRAIN_GRACE, grace)
        self.address: tuple[str, int] | None = None

    async def start(self, spawn: Spawn) -> None:
        self.address = await self.http.start(self.host, self.port, reuse_port=self.reuse_port)

    def close(self) -> None:
        self.http.draining = True

    async def join(self, deadline: Deadline) -> int:
        grace = min(self.grace, deadline.left())
        await self.http.drain(grace=grace)
        if self.http.tasks:  # answers still being worked on (rate-limit lookups)
            await asyncio.wait(set(self.http.tasks), timeout=grace)
        return 0
