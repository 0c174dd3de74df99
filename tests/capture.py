"""A PostHog-compatible capture server for tests: ``POST /batch/`` checked
the way PostHog checks it (``api_key``, ``batch``, each event's ``uuid``,
``distinct_id``, ``timestamp``, ``event``; gzip when ``Content-Encoding:
gzip``), on a free port (uvicorn in a thread). It records what it accepted
and can be told at run time to refuse: 400 for batches holding given uuids,
413 above a batch size, 429 with ``Retry-After``, 500, 401, hang; ``stop``
and ``start`` again on the same port refuse connections in between.

It is also a webhook receiver (``POST /hook``): it checks the
``X-Estat-Signature`` HMAC with ``hook_secret`` (401 when it does not
match) and records the events it accepted (``hooked``)."""

from __future__ import annotations

import asyncio
import gzip
import json
import threading
import time
import uuid
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from estat.dispatch.webhook import SIGNATURE_HEADER, verify
from tests.conftest import free_port


class CaptureServer:
    def __init__(self, api_key: str = "phc_test") -> None:
        self.api_key = api_key
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.accepted: list[dict[str, Any]] = []
        self.requests = 0
        self.gzipped = 0
        self.bad_uuids: set[str] = set()  # a batch holding one of these: 400
        self.max_batch = 10_000  # above: 413
        self.status: int | None = None  # answer this to everything (429, 500, 401)
        self.retry_after = 0
        self.hang = 0.0  # seconds before answering (a read timeout on the client)
        self.in_flight = self.most_in_flight = 0  # requests being answered; the most at once
        self.hook_secret = b"whsec_test"
        self.hooked: list[dict[str, Any]] = []
        self.hook_refused = 0
        self._lock = threading.Lock()
        self.app = Starlette(
            routes=[
                Route("/batch/", self._batch, methods=["POST"]),
                Route("/hook", self._hook, methods=["POST"]),
            ]
        )

    def start(self) -> None:
        self.server = uvicorn.Server(
            uvicorn.Config(
                self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off"
            )
        )
        self._thread = threading.Thread(target=self.server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise TimeoutError("capture server did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(10)

    def uuids(self) -> list[str]:
        with self._lock:
            return [e["uuid"] for e in self.accepted]

    async def _batch(self, request: Request) -> JSONResponse:
        with self._lock:
            self.requests += 1
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            return await self._answer(request)
        finally:
            with self._lock:
                self.in_flight -= 1

    async def _answer(self, request: Request) -> JSONResponse:
        if self.hang:
            await asyncio.sleep(self.hang)
        body = await request.body()
        if request.headers.get("content-encoding") == "gzip":
            body = gzip.decompress(body)
            with self._lock:
                self.gzipped += 1
        if self.status is not None:
            headers = {"retry-after": str(self.retry_after)} if self.retry_after else None
            return JSONResponse({"type": "error"}, status_code=self.status, headers=headers)
        try:
            doc = json.loads(body)
        except ValueError:
            return JSONResponse({"type": "validation_error", "detail": "not JSON"}, 400)
        if doc.get("api_key") != self.api_key:
            return JSONResponse({"type": "authentication_error"}, 401)
        batch = doc.get("batch")
        if not isinstance(batch, list) or not batch:
            return JSONResponse({"type": "validation_error", "detail": "batch"}, 400)
        if len(batch) > self.max_batch:
            return JSONResponse({"type": "payload_too_large"}, 413)
        for e in batch:
            try:
                uuid.UUID(e["uuid"])
                ok = (
                    isinstance(e["event"], str)
                    and isinstance(e["distinct_id"], str)
                    and e["distinct_id"]
                    and isinstance(e["timestamp"], str)
                    and isinstance(e["properties"], dict)
                )
            except (KeyError, ValueError, TypeError):
                ok = False
            if not ok or e["uuid"] in self.bad_uuids:
                return JSONResponse({"type": "validation_error", "detail": "invalid event"}, 400)
        with self._lock:
            self.accepted.extend(batch)
        return JSONResponse({"status": 1})

    async def _hook(self, request: Request) -> JSONResponse:
        body = await request.body()
        if request.headers.get("content-encoding") == "gzip":
            body = gzip.decompress(body)
        header = request.headers.get(SIGNATURE_HEADER, "")
        if not verify(self.hook_secret, body, header, time.time()):
            with self._lock:
                self.hook_refused += 1
            return JSONResponse({"error": "bad signature"}, 401)
        with self._lock:
            self.hooked.extend(json.loads(body)["batch"])
        return JSONResponse({"ok": True})
