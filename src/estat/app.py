"""Composition root: builds every stage from ``Settings`` and wires them.

Start: the DLQ recovers, the lake is checked with one bounded request
(``LAKE_STARTUP_CHECK``), then the ``Runtime`` starts the stages layer by
layer under one ``Supervisor``: the metrics flush, the two pipelines, the
DLQ replayer, and last the listener.

Shutdown (SIGTERM/SIGINT, or a stage that failed; ``estat.process`` handles
the signals): readiness goes false and the runtime stops the stages in
reverse: the listener lets requests in progress finish, the replayer ends
its file, the pipelines flush and upload within ``SHUTDOWN_TIMEOUT`` and
spill the rest to the DLQ, or count and log what they could not save.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from estat.activity.publisher import Publisher
from estat.activity_app import ROLES, Activity
from estat.admin.build import build_admin, dlq_ops
from estat.admin.workers import PauseWatcher
from estat.clock import Clock, SystemClock
from estat.codec import encode
from estat.dlq.replayer import Replayer
from estat.dlq.store import DiskStore
from estat.errors import DeliveryError, Overloaded
from estat.ingest.cors import Cors
from estat.ingest.events import EventsRoute, Limits
from estat.ingest.http import http_compiled
from estat.ingest.identity import TokenVerifier
from estat.ingest.listener import Listener
from estat.ingest.route import Route
from estat.ingest.routes import CollectRoute, HealthRoute, ReadyRoute
from estat.ingest.server import HttpLimits, HttpServer
from estat.ingest.server_events import ServerEventsRoute
from estat.lake.keys import KeyMaker
from estat.model import EventRecord
from estat.ops.fds import default_max_connections
from estat.ops.flush import MetricsFlusher
from estat.ops.host import HostGauges, disk_status
from estat.ops.ledger import Ledger
from estat.ops.logging import Sampler, count_errors, get_logger
from estat.ops.metrics import Metrics
from estat.ops.tasks import Supervisor
from estat.pause import Pauses
from estat.pipeline.gate import LakeGate
from estat.pipeline.pipeline import Pipeline
from estat.pipeline.queue import EventQueue
from estat.pipeline.uploader import Sink, UploadPolicy
from estat.runtime import Runtime
from estat.settings import Settings
from estat.stage import Deadline, Stage
from estat.store.db import Database
from estat.store.ledger import LedgerFlusher
from estat.wiring import build_dlq, build_limiter, build_sink, secret

log = get_logger("estat.app")

LAKE_CHECK_MAX_SECONDS = 5.0


class QueuePublisher:
    """The client events' hand-off, all or nothing: the events pipeline's
    queue (the lake) and, when the bus is on, the publish queue."""

    def __init__(self, queue: EventQueue, bus: Publisher | None = None) -> None:
        self._queue = queue
        self._bus = bus

    def publish(self, records: list[EventRecord]) -> None:
        bus = self._bus
        if bus is None:
            self._queue.put_many(records)
            return
        bus.check_room(len(records))  # before the lake takes them: both or neither
        bus.put(records, self._queue.put_many(records))

    def shed(self, max_events: int) -> Overloaded | None:
        bus = self._bus
        if bus is None:
            return None
        try:
            bus.check_room(max_events)
        except Overloaded as e:
            return e
        return None


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
        roles: Sequence[str] = ROLES,
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
        #: the completeness ledger: per dataset and hour, events accepted, in the lake, stored
        self.ledger = Ledger(settings.partition_tz)
        self.dlq.ledger = self.ledger
        self.gate = LakeGate(
            threshold=settings.lake_failure_threshold,
            probe_interval=settings.lake_probe_interval,
            max_probe_interval=settings.lake_probe_max_interval,
            clock=self.clock,
            metrics=self.metrics,
            on_recovered=lambda: self.replayer.notify_healthy(),
        )
        self.pauses = Pauses()
        self.replayer = Replayer(
            self.dlq,
            self.sink,
            live_busy=lambda: any(p.inbox.qsize() for p in self.pipelines),
            lake=self.gate,
            pauses=self.pauses,
        )
        self.pipeline = self._pipeline("raw", settings.raw_prefix, settings.channel_size)
        self.events_pipeline = self._pipeline(
            "events", settings.events_prefix, settings.events_channel_size
        )
        self.pipelines = (self.pipeline, self.events_pipeline)
        m = self.metrics
        self.activity = (
            Activity(settings, roles, m, self.clock, self.pauses)
            if settings.mq_provider != "none"
            else None
        )
        if settings.mq_provider == "none":
            log.warning("message queue provider is none: skipping user activity publish")
        self.limiter = build_limiter(settings, self.clock, m)
        limits = Limits(
            max_batch=settings.analytics_max_batch_size,
            max_body=settings.analytics_max_body_size,
            max_decompressed=settings.analytics_max_decompressed_size,
            max_ratio=settings.analytics_max_compression_ratio,
            max_event_size=settings.analytics_max_event_size,
            max_depth=settings.analytics_max_properties_depth,
        )
        verifier = TokenVerifier(
            secret(settings.auth_jwt_secret), secret(settings.auth_jwt_public_key)
        )
        routes: dict[bytes, Route] = {}
        if self.activity is not None:
            routes[b"/api/v1/server-events"] = ServerEventsRoute(
                self.activity.writer,
                tokens=settings.server_tokens,
                limits=limits,
                allowlist=None,
                limiter=self.limiter,
                verifier=verifier,
                cors=Cors(frozenset(), b"POST"),
                metrics=m,
            )
        self.http = HttpServer(
            {
                b"/collect": CollectRoute(
                    self.pipeline.queue.put_line,
                    max_body=settings.max_body_size,
                    cors=Cors(settings.cors_origins, b"GET, POST, OPTIONS"),
                    metrics=m,
                ),
                b"/api/v1/analytics/events": EventsRoute(
                    QueuePublisher(
                        self.events_pipeline.queue,
                        self.activity.publisher if self.activity else None,
                    ),
                    limits=limits,
                    allowlist=settings.allowlist,
                    limiter=self.limiter,
                    verifier=verifier,
                    cors=Cors(settings.cors_origins, b"POST, OPTIONS"),
                    metrics=m,
                ),
                b"/health": HealthRoute(),
                b"/ready": ReadyRoute(self._cheap_ready),
                **routes,
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
        # the admin listener (/metrics, detailed /ready, the admin API): up
        # first and down last, so a drain can be watched
        self.admin_db: Database | None = None
        db = self.activity.db if self.activity is not None else None
        if db is None:  # the pause state and the audit log
            self.admin_db = db = Database(**settings.database_args)
        self.pause_watcher = PauseWatcher(db, self.pauses, m)
        if self.activity is not None:
            self.activity.count_in(self.ledger)
        ledger_flusher = LedgerFlusher(
            self.ledger, db, m, self.clock, grace=settings.completeness_grace,
            put=lambda key, data: self.sink.put(key, data, {"estat-manifest": "1"}),
        )  # fmt: skip
        m.add_flusher(HostGauges(m, settings.data_dir).refresh)
        count_errors(lambda reason: m.log_errors.labels(reason).inc())
        self.admin = build_admin(
            settings, metrics=m, clock=self.clock, ready=self._ready, activity=self.activity,
            db=db, workers=self.pause_watcher, dlq=dlq_ops(self.dlq, self.sink),
        )  # fmt: skip
        # started in this order (the flush loop first, the listener last),
        # stopped in reverse: nothing is closed before what feeds it
        low: list[Stage] = []
        middle: list[Stage] = []
        high: list[Stage] = []
        if self.activity is not None:
            low, middle, high = self.activity.layers()
        self.runtime = Runtime(
            [
                [
                    MetricsFlusher(self.metrics),
                    ledger_flusher,
                    self.pause_watcher,
                    *([self.admin] if self.admin else []),
                    *low,
                ],
                list(self.pipelines),
                middle,
                high,
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
            partition_tz=s.partition_tz,
            ledger=self.ledger,
        )

    def lake_status(self) -> str:
        """``ok``; ``retrying: <class>`` while the latest upload attempt
        failed (batches are retried, the circuit still closed); ``failing:
        <class>`` while the circuit is open (batches go to the DLQ); the
        start-up check's verdict until a first upload succeeds."""
        err = self.gate.last_error
        if self.gate.breaker.state != "closed":
            return f"failing: {err.error_class if err else 'unknown'}"
        if err is not None:
            return f"retrying: {err.error_class}"
        if not self.gate.succeeded and self.lake_check.startswith("unreachable"):
            return self.lake_check  # nothing uploaded since the check
        return "ok"

    def _cheap_ready(self) -> tuple[bool, dict[str, object]]:
        """The ingest port's ``/ready`` for load balancers: can this process
        take events now; the details are on the admin listener."""
        ok, detail = self._ready()
        if ok:
            return True, {}
        if self.draining:
            reason = "draining"
        elif detail.get("failedStages"):
            reason = "a stage failed"
        elif not detail.get("queueHasRoom"):
            reason = "queue full"
        else:
            reason = "dlq unwritable"
        return False, {"reason": reason}

    def _ready(self) -> tuple[bool, dict[str, object]]:
        room = all(p.queue.has_room() for p in self.pipelines)
        failed = self.supervisor.failed
        detail: dict[str, object] = {
            "draining": self.draining,
            "queueHasRoom": room,
            "lake": self.lake_status(),
            "dlq": "ok" if self.gate.accepting else "unwritable",
        }
        detail["dlqDisk"] = disk_status(self.settings.dlq_path)
        if self.activity is not None:
            # reported, not required: the source outbox absorbs a bus outage
            # and the dispatch outbox a destination's
            detail["database"] = self.activity.housekeeper.database_status
            detail["bus"] = self.activity.housekeeper.bus_status
            if self.activity.dispatcher is not None:
                detail["destinations"] = self.activity.destinations()
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
        if self.activity is not None:
            await self.activity.prepare()
        elif self.admin_db is not None and self.settings.auto_migrate:
            await self.admin_db.run(self.admin_db.upgrade)
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
        if self.activity is not None:
            await self.activity.close()
        if self.admin_db is not None:
            await asyncio.to_thread(self.admin_db.close)
        self.metrics.flush()
        self._executor.shutdown(wait=False)
        self._dlq_executor.shutdown(wait=True)
        log.info(
            "shutdown complete",
            unsavedEvents=unsaved,
            durationMs=round((self.clock.monotonic() - t0) * 1000, 1),
        )
        return unsaved
