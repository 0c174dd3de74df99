"""The admin listener as a stage (``estat.stage``): uvicorn serving the
admin app in the server's own event loop.

The socket is bound at start, so an address in use fails the start like
the ingest port does. uvicorn's ``serve()`` is not used: it installs its
own SIGTERM/SIGINT handlers and raises the signal again when it ends,
which would cut estat's drain short; start, the accept loop and shutdown
are driven from here instead (``startup``, ``main_loop``, ``shutdown``).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

import uvicorn
from fastapi import FastAPI

from estat.ops.logging import get_logger
from estat.stage import Deadline, Spawn

log = get_logger("estat.admin")

SHUTDOWN_GRACE = 2.0  # seconds for admin calls in progress at a stop


class AdminListenFailed(OSError):
    """The admin listener's address cannot be bound (named: a role process
    binds no ingest address)."""


class AdminListener:
    name = "admin-listener"

    def __init__(self, app: FastAPI, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.app = app
        self.config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_config=None,
            access_log=False,
            lifespan="off",
            http="httptools",
            ws="none",
            server_header=False,
            timeout_graceful_shutdown=int(SHUTDOWN_GRACE),
        )
        self.server = uvicorn.Server(self.config)
        self._sock: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None
        self.address: tuple[str, int] | None = None

    async def start(self, spawn: Spawn) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as e:
            sock.close()
            raise AdminListenFailed(
                e.errno, f"ADMIN_ADDR {self.host}:{self.port}: {e.strerror}"
            ) from e
        sock.listen(128)
        sock.setblocking(False)
        self._sock = sock
        self.address = sock.getsockname()[:2]
        config = self.config
        if not config.loaded:
            config.load()
        self.server.lifespan = config.lifespan_class(config)
        await self.server.startup(sockets=[sock])
        self._task = spawn("admin-listener", self.server.main_loop())
        log.info("admin listener started", addr=f"{self.address[0]}:{self.address[1]}")

    def close(self) -> None:
        self.server.should_exit = True

    async def join(self, deadline: Deadline) -> int:
        self.server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._task), max(0.1, deadline.left()))
        if self.server.started:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self.server.shutdown(sockets=[self._sock] if self._sock else None),
                    max(0.1, min(SHUTDOWN_GRACE + 1, deadline.left())),
                )
        return 0
