"""Composition root: builds every stage from ``Settings``, runs them, and
shuts them down in order.

Start: the DLQ recovers, the lake is checked with one bounded request
(``LAKE_STARTUP_CHECK``), then every long-running task starts under one
``Supervisor`` and the listener opens.

Shutdown order (SIGTERM/SIGINT, or a stage that failed): readiness goes
false; the listener stops accepting and lets requests in progress finish;
the event queue is closed and flushed into batches; uploads finish within
``SHUTDOWN_TIMEOUT``; whatever could not be stored by then is spilled to the
DLQ, or counted and logged. Exit status 0 when every accepted event was
stored or saved and no stage failed; 1 otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
from concurrent.futures import ThreadPoolExecutor

import uvloop
from pydantic import SecretStr

from estat.clock import Clock, SystemClock
from estat.codec import encode
from estat.dlq.queue import DeadLetterQueue
from estat.dlq.replayer import Replayer
from estat.dlq.store import DiskStore
from estat.errors import DeliveryError
from estat.ingest.events import Cors, EventRecord, EventsRoute, Limits
from estat.ingest.http import HttpLimits, HttpServer, http_compiled
from estat.ingest.identity import TokenVerifier
from estat.ingest.ratelimit import (
    MemoryRateLimiter,
    RateLimiter,
    RedisRateLimiter,
    SharedRateLimiter,
)
from estat.ingest.routes import (
    CollectRoute,
    HealthRoute,
    MetricsRoute,
    OpenAPIRoute,
    ReadyRoute,
)
from estat.lake.keys import KeyMaker
from estat.lake.sink import ObjectStoreSink, local_sink, s3_sink
from estat.ops.logging import Sampler, get_logger, setup_logging
from estat.ops.metrics import Metrics
from estat.ops.tasks import Supervisor
from estat.pipeline.gate import LakeGate
from estat.pipeline.pipeline import Pipeline
from estat.pipeline.queue import EventQueue
from estat.pipeline.uploader import Sink, UploadPolicy
from estat.runtime import Runtime
from estat.settings import Settings
from estat.stage import Deadline, Spawn

log = get_logger("estat.app")

METRICS_FLUSH_SECONDS = 0.5
LAKE_CHECK_MAX_SECONDS = 5.0
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


def build_dlq(
    settings: Settings,
    store: DiskStore,
    clock: Clock,
    metrics: Metrics,
    executor: ThreadPoolExecutor | None,
    destination: str,
) -> DeadLetterQueue:
    """The DLQ over ``store`` with the configured capacity, TTL and quarantine
    prefix; ``destination`` (the lake's description) is recorded in every file."""
    return DeadLetterQueue(
        store,
        max_bytes=settings.dlq_max_size_bytes,
        max_age=settings.dlq_max_age,
        clock=clock,
        metrics=metrics,
        executor=executor,
        quarantine_prefix=settings.dlq_prefix,
        attempt_timeout=settings.s3_timeout,
        destination=destination,
    )


def _secret(value: SecretStr | None) -> str | None:
    return value.get_secret_value() if value is not None else None


#: descriptors kept for everything that is not a client connection
FD_RESERVE = 128


def raise_nofile_limit() -> int:
    """Raise the open-file limit to its hard limit; returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft


def default_max_connections() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(16, (soft - FD_RESERVE) * 3 // 4)


def build_limiter(settings: Settings, clock: Clock, metrics: Metrics) -> RateLimiter:
    """Redis when configured (every replica shares it); else, under
    ``--workers N``, the supervisor's shared limiter (one limit for the
    server); else in-process windows."""
    if settings.rate_limit_redis_url:
        return RedisRateLimiter(
            settings.rate_limit_redis_url.get_secret_value(),
            settings.analytics_rate_limit_max_requests,
            settings.analytics_rate_limit_window,
            metrics,
        )
    shared = os.environ.get("ESTAT_RATE_LIMIT_SOCKET")
    if shared:
        return SharedRateLimiter(shared, metrics)
    return MemoryRateLimiter(
        settings.analytics_rate_limit_max_requests, settings.analytics_rate_limit_window, clock
    )


class QueuePublisher:
    """The client events' hand-off: the events pipeline's queue, all or nothing."""

    def __init__(self, queue: EventQueue) -> None:
        self._queue = queue

    def publish(self, records: list[EventRecord]) -> None:
        self._queue.put_many(records)


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


class MetricsFlusher:
    """Folds the hot-path tallies into the metrics every half second."""

    name = "metrics-flush"

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics
        self._task: asyncio.Task[None] | None = None

    async def start(self, spawn: Spawn) -> None:
        self._task = spawn("metrics-flush", self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(METRICS_FLUSH_SECONDS)
            self._m.flush()

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def join(self, deadline: Deadline) -> int:
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._m.flush()
        return 0


class LakeCheckFailed(Exception):
    """``LAKE_STARTUP_CHECK=require`` and the lake did not answer."""

    def __init__(self, err: DeliveryError) -> None:
        super().__init__(f"lake check failed: {err.error_class}")
        self.error = err


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
        self.dlq = build_dlq(
            settings,
            DiskStore(settings.dlq_path),
            self.clock,
            self.metrics,
            self._dlq_executor,
            self.sink.description,
        )
        self.supervisor = Supervisor(self.metrics, self._stage_failed)
        self.gate = LakeGate(
            threshold=settings.lake_failure_threshold,
            probe_interval=settings.lake_probe_interval,
            max_probe_interval=settings.lake_probe_max_interval,
            clock=self.clock,
            metrics=self.metrics,
            on_recovered=lambda: self.replayer.notify_healthy(),
        )
        self.replayer = Replayer(
            self.dlq,
            self.sink,
            live_busy=lambda: any(p.inbox.qsize() for p in self.pipelines),
            lake=self.gate,
        )
        self.pipeline = self._pipeline("raw", settings.raw_prefix, settings.channel_size)
        self.events_pipeline = self._pipeline(
            "events", settings.events_prefix, settings.events_channel_size
        )
        self.pipelines = (self.pipeline, self.events_pipeline)
        m = self.metrics
        self.limiter = build_limiter(settings, self.clock, m)
        self.http = HttpServer(
            {
                b"/collect": CollectRoute(
                    self.pipeline.queue.put_line,
                    max_body=settings.max_body_size,
                    cors=Cors(settings.cors_origins, b"GET, POST, OPTIONS"),
                ),
                b"/api/v1/analytics/events": EventsRoute(
                    QueuePublisher(self.events_pipeline.queue),
                    limits=Limits(
                        max_batch=settings.analytics_max_batch_size,
                        max_body=settings.analytics_max_body_size,
                        max_decompressed=settings.analytics_max_decompressed_size,
                        max_ratio=settings.analytics_max_compression_ratio,
                        max_event_size=settings.analytics_max_event_size,
                        max_depth=settings.analytics_max_properties_depth,
                    ),
                    allowlist=settings.allowlist,
                    limiter=self.limiter,
                    verifier=TokenVerifier(
                        _secret(settings.auth_jwt_secret), _secret(settings.auth_jwt_public_key)
                    ),
                    cors=Cors(settings.cors_origins, b"POST, OPTIONS"),
                    metrics=m,
                ),
                b"/health": HealthRoute(),
                b"/ready": ReadyRoute(self._ready),
                b"/metrics": MetricsRoute(m),
                b"/openapi.json": OpenAPIRoute(),
            },
            limits=HttpLimits(
                max_head=settings.http_max_header_size,
                header_timeout=settings.http_header_timeout,
                body_timeout=settings.http_body_timeout,
                keepalive_timeout=settings.http_keepalive_timeout,
                max_connections=settings.max_connections or default_max_connections(),
            ),
            metrics=m,
            log_sample=Sampler(settings.log_sample_n),
        )
        self.http.on_failure = lambda name, exc: self.supervisor.fail(name, exc, "raised")
        self.draining = False
        self.address: tuple[str, int] | None = None
        host, port = settings.listen
        self.listener = Listener(
            self.http, host, port, reuse_port=reuse_port, grace=settings.shutdown_timeout / 4
        )
        # started in this order (the flush loop first, the listener last),
        # stopped in reverse: nothing is closed before what feeds it
        self.runtime = Runtime(
            [
                [MetricsFlusher(self.metrics)],
                list(self.pipelines),
                [self.replayer],
                [self.listener],
            ],
            self.supervisor,
            self.clock,
        )
        self._stop = asyncio.Event()
        #: the start-up check's verdict: "ok", or "unreachable: <class>"
        self.lake_check = "unchecked"

    def _stage_failed(self, name: str) -> None:
        self._stop.set()

    def _pipeline(self, name: str, prefix: str, channel_size: int) -> Pipeline:
        s = self.settings
        return Pipeline(
            sink=self.sink,
            make_key=KeyMaker(prefix, s.instance_id, s.partition_tz).make,
            encode=encode,
            clock=self.clock,
            metrics=self.metrics,
            instance=s.instance_id,
            channel_size=channel_size,
            channel_max_bytes=s.channel_max_bytes,
            batch_size=s.batch_size,
            batch_max_bytes=s.batch_max_bytes,
            flush_interval=s.flush_interval,
            upload_queue=s.upload_queue,
            upload_concurrency=s.upload_concurrency,
            policy=UploadPolicy.with_retries(s.s3_app_retries, s.s3_timeout),
            executor=self._executor,
            spill=self.dlq,
            gate=self.gate,
            name=name,
        )

    def lake_status(self) -> str:
        state = self.gate.breaker.state
        if state != "closed":
            err = self.gate.last_error
            return f"failing: {err.error_class if err else 'unknown'}"
        if self.gate.last_error is None and self.lake_check.startswith("unreachable"):
            return self.lake_check  # nothing has been uploaded since the check
        return "ok"

    def _ready(self) -> tuple[bool, dict[str, object]]:
        room = all(p.queue.has_room() for p in self.pipelines)
        failed = self.supervisor.failed
        detail: dict[str, object] = {
            "draining": self.draining,
            "queueHasRoom": room,
            "lake": self.lake_status(),
            "dlq": "ok" if self.gate.accepting else "unwritable",
        }
        if failed:
            detail["failedStages"] = list(failed)
        ready = not self.draining and room and self.gate.accepting and not failed
        return ready, detail

    async def check_lake(self) -> DeliveryError | None:
        """One bounded request to the lake; the verdict goes to the log, /ready and ``lake_healthy``."""
        check = getattr(self.sink, "check", None)
        if check is None:
            self.lake_check = "ok"
            self.metrics.lake_healthy.set(1)
            return None
        prefix = self.settings.raw_prefix
        # bounded by S3_TIMEOUT, and never more than a few seconds of start-up
        timeout = min(self.settings.s3_timeout, LAKE_CHECK_MAX_SECONDS)
        err: DeliveryError | None = await check(prefix, timeout)
        if err is None:
            self.lake_check = "ok"
            self.metrics.lake_healthy.set(1)
            log.info("lake check ok", lake=self.sink.description)
        else:
            self.lake_check = f"unreachable: {err.error_class}"
            self.metrics.lake_healthy.set(0)
            log.error(
                "lake check failed: batches will go to the DLQ until the lake answers",
                lake=self.sink.description,
                errorClass=err.error_class,
                error=str(err).splitlines()[0][:300],
            )
        return err

    async def start(self) -> tuple[str, int]:
        await self.dlq.start()
        err = await self.check_lake()
        if err is not None and self.settings.lake_startup_check == "require":
            raise LakeCheckFailed(err)
        await self.runtime.start()
        assert self.listener.address is not None
        self.address = address = self.listener.address
        log.info(
            "estat started",
            addr=f"{address[0]}:{address[1]}",
            lake=self.sink.description,
            instance=self.settings.instance_id,
            pid=os.getpid(),
            compiled=http_compiled(),
        )
        return address

    def request_stop(self) -> None:
        self._stop.set()

    async def wait_for_stop(self) -> None:
        await self._stop.wait()

    async def shutdown(self) -> int:
        """Drain and stop. Returns the number of accepted events not stored."""
        t0 = self.clock.monotonic()
        deadline = t0 + self.settings.shutdown_timeout
        self.draining = True
        pending = sum(p.pending_events() for p in self.pipelines)
        log.info(
            "shutdown: draining", pendingEvents=pending, timeoutS=self.settings.shutdown_timeout
        )
        unsaved = await self.runtime.stop(Deadline(deadline, self.clock))
        await self.limiter.close()
        await self.sink.close()
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
    raise_nofile_limit()
    app = App(settings, reuse_port=reuse_port)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, app.request_stop)
    # blocked by the CLI from the start, so a signal that arrived during
    # start-up is delivered now, to the handler, instead of killing the process
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
    try:
        await app.start()
    except OSError as e:
        log.error("cannot listen", addr=settings.http_addr, error=str(e))
        return 2
    except LakeCheckFailed as e:
        log.error("LAKE_STARTUP_CHECK=require: not starting", errorClass=e.error.error_class)
        return 2
    await app.wait_for_stop()
    # The handlers stay installed: a second SIGTERM (systemd and `docker stop`
    # signal every process of the group; an impatient operator) must not cut
    # the drain short.
    unsaved = await app.shutdown()
    # Drained: a late signal must not turn this clean exit into a kill. The
    # loop's handlers would fall back to the default action when it closes.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(sig)
        signal.signal(sig, signal.SIG_IGN)
    if unsaved or app.supervisor.failed:
        log.error(
            "exiting with an error",
            unsavedEvents=unsaved,
            failedStages=list(app.supervisor.failed),
        )
        return 1
    return 0


def serve(settings: Settings, *, reuse_port: bool = False) -> int:
    """Run one estat process until SIGTERM/SIGINT; exit status 0 after a drain."""
    setup_logging(settings.log_level, pretty=settings.log_pretty, env=settings.deploy_env)
    return uvloop.run(_serve(settings, reuse_port))
