"""Composition root: builds every stage from ``Settings``, runs them, and
shuts them down in order.

Shutdown order (SIGTERM/SIGINT): readiness goes false; the listener stops
accepting and lets requests in progress finish; the event queue is closed
and flushed into batches; uploads finish within ``SHUTDOWN_TIMEOUT``;
whatever could not be stored by then is counted and logged; exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from concurrent.futures import ThreadPoolExecutor

import uvloop

from estat.clock import Clock, SystemClock
from estat.codec import encode
from estat.dlq.queue import DeadLetterQueue
from estat.dlq.replayer import Replayer
from estat.dlq.store import DiskStore
from estat.ingest.http import HttpLimits, HttpServer
from estat.ingest.routes import CollectRoute, HealthRoute, MetricsRoute, ReadyRoute
from estat.lake.keys import KeyMaker
from estat.lake.sink import ObjectStoreSink, local_sink, s3_sink
from estat.ops.logging import Sampler, get_logger, setup_logging
from estat.ops.metrics import Metrics
from estat.pipeline.pipeline import Pipeline
from estat.pipeline.uploader import RetryPolicy, Sink
from estat.settings import Settings

log = get_logger("estat.app")

METRICS_FLUSH_SECONDS = 0.5
HTTP_DRAIN_GRACE = 2.0


def build_sink(settings: Settings) -> ObjectStoreSink:
    if settings.raw_bucket:
        return s3_sink(
            settings.raw_bucket,
            region=settings.aws_region,
            endpoint=settings.s3_endpoint_url,
            timeout=settings.s3_timeout,
        )
    return local_sink(settings.lake_path)


class App:
    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock | None = None,
        metrics: Metrics | None = None,
        reuse_port: bool = False,
        sink: Sink | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock or SystemClock()
        self.metrics = metrics or Metrics()
        self.reuse_port = reuse_port
        self.sink: Sink = sink if sink is not None else build_sink(settings)
        self._executor = ThreadPoolExecutor(
            max_workers=settings.upload_concurrency, thread_name_prefix="estat-encode"
        )
        self._dlq_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="estat-dlq")
        self.dlq = DeadLetterQueue(
            DiskStore(settings.dlq_path),
            max_bytes=settings.dlq_max_size_bytes,
            max_age=settings.dlq_max_age,
            clock=self.clock,
            metrics=self.metrics,
            executor=self._dlq_executor,
            quarantine_prefix=settings.dlq_prefix,
            attempt_timeout=settings.s3_timeout,
        )
        self.replayer = Replayer(
            self.dlq, self.sink, live_busy=lambda: self.pipeline.inbox.qsize() > 0
        )
        self.pipeline = Pipeline(
            sink=self.sink,
            make_key=KeyMaker(
                settings.raw_prefix, settings.instance_id, settings.partition_tz
            ).make,
            encode=encode,
            clock=self.clock,
            metrics=self.metrics,
            instance=settings.instance_id,
            channel_size=settings.channel_size,
            channel_max_bytes=settings.channel_max_bytes,
            batch_size=settings.batch_size,
            batch_max_bytes=settings.batch_max_bytes,
            flush_interval=settings.flush_interval,
            upload_queue=settings.upload_queue,
            upload_concurrency=settings.upload_concurrency,
            policy=RetryPolicy(
                retries=settings.s3_app_retries, attempt_timeout=settings.s3_timeout
            ),
            executor=self._executor,
            spill=self.dlq,
            on_upload_success=self.replayer.notify_healthy,
        )
        m = self.metrics
        self.http = HttpServer(
            {
                b"/collect": CollectRoute(self.pipeline.queue.put, max_body=settings.max_body_size),
                b"/health": HealthRoute(),
                b"/ready": ReadyRoute(self._ready),
                b"/metrics": MetricsRoute(m),
            },
            limits=HttpLimits(
                max_head=settings.http_max_header_size,
                header_timeout=settings.http_header_timeout,
                body_timeout=settings.http_body_timeout,
                keepalive_timeout=settings.http_keepalive_timeout,
            ),
            metrics=m,
            log_sample=Sampler(settings.log_sample_n),
        )
        self.draining = False
        self.address: tuple[str, int] | None = None
        self._flush_task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    def _ready(self) -> tuple[bool, dict[str, object]]:
        q = self.pipeline.queue
        room = len(q) < q.max_events and q.nbytes < q.max_bytes
        lake = "failing" if self.pipeline.uploader.consecutive_failures else "ok"
        detail: dict[str, object] = {"draining": self.draining, "queueHasRoom": room, "lake": lake}
        return (not self.draining and room), detail

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(METRICS_FLUSH_SECONDS)
            self.metrics.flush()

    async def start(self) -> tuple[str, int]:
        await self.dlq.start()
        self.pipeline.start()
        self.replayer.start()
        host, port = self.settings.listen
        self.address = await self.http.start(host, port, reuse_port=self.reuse_port)
        self._flush_task = asyncio.create_task(self._flush_loop(), name="metrics-flush")
        log.info(
            "estat started",
            addr=f"{self.address[0]}:{self.address[1]}",
            lake=self.sink.description,
            instance=self.settings.instance_id,
            pid=os.getpid(),
        )
        return self.address

    def request_stop(self) -> None:
        self._stop.set()

    async def wait_for_stop(self) -> None:
        await self._stop.wait()

    async def shutdown(self) -> int:
        """Drain and stop. Returns the number of accepted events not stored."""
        t0 = self.clock.monotonic()
        deadline = t0 + self.settings.shutdown_timeout
        self.draining = True
        pending = self.pipeline.pending_events()
        log.info(
            "shutdown: draining", pendingEvents=pending, timeoutS=self.settings.shutdown_timeout
        )
        grace = min(HTTP_DRAIN_GRACE, self.settings.shutdown_timeout / 4)
        await asyncio.gather(self.http.drain(grace=grace), self.replayer.stop(grace=grace))
        unsaved = await self.pipeline.drain(deadline)
        await self.sink.close()
        if self._flush_task is not None:
            self._flush_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flush_task
        self.metrics.flush()
        self._executor.shutdown(wait=False)
        self._dlq_executor.shutdown(wait=True)
        log.info(
            "shutdown complete",
            unsavedEvents=unsaved,
            durationMs=round((self.clock.monotonic() - t0) * 1000, 1),
        )
        return unsaved


async def _serve(settings: Settings, reuse_port: bool) -> int:
    app = App(settings, reuse_port=reuse_port)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, app.request_stop)
    try:
        await app.start()
    except OSError as e:
        log.error("cannot listen", addr=settings.http_addr, error=str(e))
        return 2
    await app.wait_for_stop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(sig)
    await app.shutdown()
    return 0


def serve(settings: Settings, *, reuse_port: bool = False) -> int:
    """Run one estat process until SIGTERM/SIGINT; exit status 0 after a drain."""
    setup_logging(settings.log_level, pretty=settings.log_pretty, env=settings.deploy_env)
    return uvloop.run(_serve(settings, reuse_port))
