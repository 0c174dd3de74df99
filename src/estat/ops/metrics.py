"""Every metric estat exports, declared in one place with its meaning.

Names are the runbook's contract: tests assert them. Label values are low
cardinality (routes, status codes, error classes), never ids, IPs or raw
error text.

Hot paths do not call ``prometheus_client`` per request. They bump plain
integers (``Tally``, ``FastHistogram``) that ``Metrics.flush()`` folds into
the real metric objects; ``flush()`` runs every half second, before every
``/metrics`` answer and at exit. A ``/metrics`` answer therefore shows this
process's values exactly and other workers' values at most half a second
old.

With several workers (``estat serve --workers N``) the parent sets
``PROMETHEUS_MULTIPROC_DIR`` for its children; ``prometheus_client`` then
keeps every worker's values in shared files and any worker's ``/metrics``
reports the sum over all workers, including those that exited (counters
never go backwards when a worker is restarted).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Literal

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.openmetrics.exposition import generate_latest as om_generate_latest

from estat.ops.hist import FastHistogram

LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
UPLOAD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Tally:
    """A counter for hot paths: ``tally.n += 1`` costs one attribute add."""

    __slots__ = ("_flushed", "_target", "n")

    def __init__(self, target: Counter) -> None:
        self.n = 0
        self._flushed = 0
        self._target = target

    def flush(self) -> None:
        delta = self.n - self._flushed
        if delta:
            self._target.inc(delta)
            self._flushed += delta


class Metrics:
    """The metric objects, on an injectable registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.multiprocess_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
        r = self.registry

        def counter(name: str, doc: str, labels: Sequence[str] = ()) -> Counter:
            return Counter(name.removesuffix("_total"), doc, labels, registry=r)

        def gauge(
            name: str,
            doc: str,
            labels: Sequence[str] = (),
            mode: Literal["livesum", "livemostrecent", "livemin", "livemax"] = "livesum",
        ) -> Gauge:
            # livesum: each worker's own share (queues); livemostrecent: a
            # shared resource every worker measures (the DLQ directory);
            # livemin / livemax: the worst worker's view of a health flag
            return Gauge(name, doc, labels, registry=r, multiprocess_mode=mode)

        # -- seed 001/000 collector metrics (exact names) --------------------
        self.http_requests = counter(
            "http_requests_total", "HTTP requests received by the ingest listener, every route."
        )
        self.http_accepted = counter(
            "http_requests_accepted_total",
            "Ingest requests whose events were enqueued (answered 2xx).",
        )
        self.http_too_large = counter(
            "http_requests_rejected_body_too_large_total",
            "Ingest requests refused with 413 because the body exceeded its limit.",
        )
        self.http_queue_full = counter(
            "http_requests_rejected_queue_full_total",
            "Ingest requests refused with 503 because an event queue was full (backpressure). "
            "Other 503s (draining, lake unavailable, /ready) are not counted here.",
        )
        self.s3_events_stored = counter(
            "s3_events_stored_total", "Events stored in the lake (S3 or local directory)."
        )
        self.s3_put_errors = counter(
            "s3_put_errors_total", "Failed lake upload attempts (each retry counts)."
        )
        self.dlq_events_enqueued = counter(
            "dlq_events_enqueued_total", "Events written to the local DLQ after upload failure."
        )
        self.dlq_events_reuploaded = counter(
            "dlq_events_reuploaded_total", "Events replayed from the local DLQ into the lake."
        )
        self.dlq_events_dropped = counter(
            "dlq_events_dropped_total",
            "Events lost because the DLQ could not hold them (must stay 0).",
        )
        self.dlq_files_expired = counter(
            "dlq_files_expired_total", "DLQ files deleted by DLQ_MAX_AGE."
        )
        self.dlq_files_current = gauge(
            "dlq_files_current", "Files currently in the local DLQ.", mode="livemostrecent"
        )
        self.dlq_size_bytes = gauge(
            "dlq_size_bytes", "Bytes currently in the local DLQ.", mode="livemostrecent"
        )
        self.dlq_write_errors = counter(
            "dlq_write_errors_total",
            "Failed DLQ writes (disk full, I/O error, read-only): the batch stays in memory.",
        )
        self.dlq_events_expired = counter(
            "dlq_events_expired_total", "Events in DLQ files deleted by DLQ_MAX_AGE (lost)."
        )
        self.dlq_files_quarantined = counter(
            "dlq_files_quarantined_total",
            "Invalid DLQ files (torn, corrupt, bad JSON) uploaded under DLQ_PREFIX.",
        )
        self.dlq_events_quarantined = counter(
            "dlq_events_quarantined_total", "Events in DLQ files that were quarantined."
        )
        self.dlq_replay_failures = counter(
            "dlq_replay_failures_total", "DLQ replay uploads that failed (the file is kept)."
        )

        # -- estat's own ----------------------------------------------------
        self.http_responses = counter(
            "http_responses_total",
            "HTTP responses by route and status code.",
            ("route", "status"),
        )
        self.http_duration = Histogram(
            "http_request_duration_seconds",
            "Time from the start of a request to its response being written.",
            ("route",),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.http_connections = gauge(
            "http_connections_current", "Open connections on the ingest listener."
        )
        self.http_connections_shed = counter(
            "http_connections_shed_total",
            "Connections closed (the oldest idle one) or refused (all busy) because the "
            "listener was at MAX_CONNECTIONS.",
        )
        self.event_queue_events = gauge(
            "event_queue_events",
            "Events waiting in a dataset's event queue (CHANNEL_SIZE / EVENTS_CHANNEL_SIZE bound it).",
            ("dataset",),
        )
        self.event_queue_bytes = gauge(
            "event_queue_bytes",
            "Bytes of records waiting in a dataset's event queue.",
            ("dataset",),
        )
        self.event_queue_capacity = gauge(
            "event_queue_capacity",
            "Capacity of a dataset's event queue in events (for fill ratios).",
            ("dataset",),
        )
        self.upload_queue_batches = gauge(
            "upload_queue_batches",
            "Batches of a dataset waiting for upload (UPLOAD_QUEUE bounds it).",
            ("dataset",),
        )
        self.uploads_in_flight = gauge(
            "uploads_in_flight", "Lake uploads in progress, by dataset.", ("dataset",)
        )
        self.batches_cut = counter(
            "batches_cut_total",
            "Batches cut by the batcher, by dataset and reason (size, bytes, age, hour: the "
            "partition hour ended, drain).",
            ("dataset", "reason"),
        )
        self.http_refused = counter(
            "http_requests_refused_total",
            "Ingest requests answered 503 for another reason than a full event queue: "
            "draining, or lake_unavailable (neither the lake nor the DLQ can save a batch).",
            ("route", "reason"),
        )
        self.s3_objects_stored = counter("s3_objects_stored_total", "Objects stored in the lake.")
        self.s3_bytes_stored = counter(
            "s3_bytes_stored_total", "Compressed bytes stored in the lake."
        )
        self.s3_put_errors_by_class = counter(
            "s3_put_errors_by_class_total",
            "Failed lake upload attempts by error class.",
            ("error_class",),
        )
        self.s3_put_duration = Histogram(
            "s3_put_duration_seconds",
            "Duration of one lake upload attempt.",
            ("result",),
            buckets=UPLOAD_BUCKETS,
            registry=r,
        )
        self.analytics_events = counter(
            "analytics_ingest_events_total",
            "Client events by result (accepted, rejected) and reason code.",
            ("result", "reason"),
        )
        self.analytics_rate_limited = counter(
            "analytics_ingest_rate_limited_total", "Client event requests answered 429."
        )
        self.analytics_not_allowed = counter(
            "analytics_ingest_event_not_allowed_total",
            "Client event requests refused because an event name is not in the allowlist.",
        )
        self.rate_limiter_errors = counter(
            "analytics_rate_limiter_errors_total",
            "Rate-limiter backend failures (the request was allowed: fail open).",
            ("backend",),
        )
        self.events_unsaved = counter(
            "shutdown_events_unsaved_total",
            "Accepted events neither stored nor saved to the DLQ before the process exited "
            "(the drain deadline, or a failed stage): lost.",
        )
        self.dlq_spills_refused = counter(
            "dlq_spills_refused_total",
            "Batches the DLQ refused because it was full and nothing could be evicted "
            "(the batch stays in memory and ingest answers 503).",
        )
        self.stage_failures = counter(
            "stage_failures_total",
            "Long-running tasks that failed (raised or stopped unexpectedly), by stage; "
            "the process drains and exits non-zero.",
            ("stage",),
        )
        self.lake_healthy = gauge(
            "lake_healthy",
            "1 if the start-up check of the lake (bucket or directory) succeeded, else 0.",
            mode="livemin",
        )
        self.lake_circuit_state = gauge(
            "lake_circuit_state",
            "Lake circuit: 0 closed (uploading), 1 open (failing: batches go to the DLQ), "
            "2 half-open (one probe upload in flight).",
            mode="livemax",
        )
        self.lake_circuit_transitions = counter(
            "lake_circuit_transitions_total",
            "Lake circuit state changes, by the state entered.",
            ("state",),
        )
        self.pipeline_accepting = gauge(
            "pipeline_accepting",
            "0 while ingest refuses (503) because neither the lake nor the DLQ can save a batch.",
            mode="livemin",
        )

        # -- seed 004 user-activity pipeline (Prometheus spelling of its names) --
        self.outbox_enqueue = counter(
            "analytics_user_activity_outbox_enqueue_total",
            "Source outbox rows written, by result (inserted, duplicate, fail).",
            ("result",),
        )
        self.outbox_publish = counter(
            "analytics_user_activity_outbox_publish_total",
            "Source outbox rows published to the bus by the relay, by result (success, fail).",
            ("result",),
        )
        self.outbox_retry = counter(
            "analytics_user_activity_outbox_retry_total",
            "Source outbox rows that failed to publish: scheduled for a retry, or parked "
            "(max attempts reached; replay by hand).",
            ("result",),
        )
        self.dispatch_enqueue = counter(
            "analytics_user_activity_dispatch_enqueue_total",
            "Dispatch outbox rows written by the store consumer, by result and target.",
            ("result", "target"),
        )
        self.dispatch_execute = counter(
            "analytics_user_activity_dispatch_execute_total",
            "Dispatch outbox rows sent to a destination, by result (success: delivered; "
            "fail: retried later, or refused for good and parked) and target.",
            ("result", "target"),
        )
        self.dispatch_retry = counter(
            "analytics_user_activity_dispatch_retry_total",
            "Dispatch outbox rows that were not delivered: scheduled for a retry, or parked "
            "(max attempts reached, or refused by the destination; replay by hand).",
            ("result", "target"),
        )
        self.dispatch_circuit = counter(
            "analytics_user_activity_dispatch_circuit_total",
            "Transitions of a target's circuit breaker, by the state entered (open, half_open, "
            "closed); counted by the dispatcher that made the transition.",
            ("state", "target"),
        )
        self.dispatch_circuit_state = gauge(
            "dispatch_circuit_state",
            "A target's circuit breaker as this process last saw it: 0 closed, 1 half-open "
            "(one probe batch in flight), 2 open (rows wait, not charged a retry).",
            ("target",),
            mode="livemax",
        )
        self.dispatch_config_error = gauge(
            "dispatch_config_error",
            "1 while a target refuses the credentials (401 / 403: POSTHOG_API_KEY, the "
            "webhook secret): rows are retried, never parked, until the configuration is fixed.",
            ("target",),
            mode="livemax",
        )
        self.dispatch_latency = Histogram(
            "dispatch_delivery_latency_seconds",
            "Time from the store consumer enqueuing an event to its delivery, by target.",
            ("target",),
            buckets=DISPATCH_LATENCY_BUCKETS,
            registry=r,
        )
        self.dispatch_oldest_due = gauge(
            "dispatch_oldest_due_age_seconds",
            "Age of the oldest dispatch outbox row that is due now (waiting to be sent), by "
            "target; 0 when none is.",
            ("target",),
            mode="livemostrecent",
        )
        self.mq_publish = counter(
            "mq_publish_count_total",
            "Messages handed to the bus, by result (success, fail).",
            ("topic", "provider", "result"),
        )
        self.mq_consume = counter(
            "mq_consume_count_total",
            "Messages consumed from the bus, by result (success, fail: retried later, parked).",
            ("topic", "provider", "result"),
        )
        self.mq_consume_latency = Histogram(
            "mq_consume_latency_seconds",
            "Time from fetching a batch of messages to acking it (store transaction included).",
            ("topic", "provider"),
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.store_events = counter(
            "store_events_total",
            "Events the store consumer wrote to user_activity_event, by result "
            "(inserted, duplicate, failed).",
            ("result",),
        )
        self.source_outbox_rows = gauge(
            "source_outbox_rows",
            "Source outbox rows by status (PENDING, FAILED, PARKED, PUBLISHED); PARKED are "
            "FAILED rows with no next retry.",
            ("status",),
            mode="livemostrecent",
        )
        self.dispatch_outbox_rows = gauge(
            "dispatch_outbox_rows",
            "Dispatch outbox rows by status (PENDING, FAILED, PARKED, DISPATCHED) and target; "
            "PARKED are FAILED rows with no next retry.",
            ("status", "target"),
            mode="livemostrecent",
        )
        self.bus_pending = gauge(
            "mq_pending_messages",
            "Messages published and not yet acked by the store consumers' group.",
            ("topic", "provider"),
            mode="livemostrecent",
        )
        self.bus_parked = gauge(
            "mq_parked_messages",
            "Messages parked after MQ_MAX_DELIVERIES (<stream>:dlq).",
            ("topic", "provider"),
            mode="livemostrecent",
        )
        self.publish_queue_events = gauge(
            "activity_publish_queue_events",
            "Accepted client events waiting in memory to be published to the bus.",
        )
        self.publish_fallback = counter(
            "activity_publish_fallback_total",
            "Accepted client events that did not go straight to the bus, by where they went "
            "(outbox: the source outbox as FAILED; spool: the local spool at shutdown; "
            "held: kept in memory while the database was unreachable, per attempt).",
            ("to",),
        )
        self.worker_paused = gauge(
            "worker_paused",
            "1 while an operator has paused the worker (relay, store, dlq-replayer): its "
            "backlog waits (outbox, bus, DLQ) until it is resumed.",
            ("worker",),
            mode="livemax",
        )
        self.admin_requests = counter(
            "admin_requests_total",
            "Calls of the admin listener, by route template and status.",
            ("route", "status"),
        )
        self.admin_auth_failures = counter(
            "admin_auth_failures_total",
            "Refused admin calls, by code (ADMIN_TOKEN_REQUIRED, ADMIN_TOKEN_INVALID, "
            "ADMIN_SCOPE_REQUIRED, ADMIN_TOO_MANY_FAILURES).",
            ("code",),
        )
        self.spool_events = gauge(
            "activity_spool_events",
            "Events in the local publish spool (written at shutdown with bus and database "
            "down; published at the next start).",
            mode="livemostrecent",
        )
        self.completeness_gap = gauge(
            "completeness_gap_events",
            "Events accepted for a lake partition hour of the last 48 hours and not in the lake "
            "once the hour closed and COMPLETENESS_GRACE passed (the completeness ledger), by "
            "dataset: lost, or still in a DLQ.",
            ("dataset",),
            mode="livemax",
        )
        self.log_errors = counter(
            "log_errors_total",
            "ERROR log lines, by reason (the line's msg): every error the log reports is "
            "also a number to alert on.",
            ("reason",),
        )
        self.retention_deleted = counter(
            "retention_rows_deleted_total",
            "Rows deleted by retention, by table (source_outbox: PUBLISHED, dispatch_outbox: "
            "DISPATCHED, audit); trace rows are in mq_trace_rows_total.",
            ("table",),
        )
        self.trace_rows = counter(
            "mq_trace_rows_total",
            "message_queue_trace_log rows written, and deleted by retention, by action.",
            ("action",),
        )

        self.lake_last_upload = gauge(
            "lake_last_upload_timestamp_seconds",
            "Unix time of the latest batch stored in the lake (a live upload or a DLQ replay); "
            "0 before the first.",
            mode="livemax",
        )
        # -- the host (ops/host.py) ------------------------------------------------
        self.process_start_time = gauge(
            "process_start_time_seconds",
            "Unix time of the latest start among estat's processes: restarts are "
            "changes(process_start_time_seconds[10m]).",
            mode="livemax",
        )
        self.resident_memory = gauge(
            "process_resident_memory_bytes",
            "Resident memory of estat's processes (summed over the workers).",
        )
        self.memory_limit = gauge(
            "process_memory_limit_bytes",
            "The memory estat may use: the cgroup's limit, else the machine's.",
            mode="livemax",
        )
        self.data_dir_total = gauge(
            "data_dir_disk_total_bytes",
            "Size of the filesystem holding DATA_DIR (the DLQ, the spool, SQLite).",
            mode="livemostrecent",
        )
        self.data_dir_free = gauge(
            "data_dir_disk_free_bytes",
            "Free bytes on the filesystem holding DATA_DIR.",
            mode="livemostrecent",
        )

        self._flushers: list[Callable[[], None]] = []

    def add_flusher(self, fn: Callable[[], None]) -> None:
        """Register a callable that folds hot-path tallies into the metrics."""
        self._flushers.append(fn)

    def tally(self, counter: Counter) -> Tally:
        t = Tally(counter)
        self._flushers.append(t.flush)
        return t

    def fast_histogram(self, histogram: Histogram) -> FastHistogram:
        """A hot-path view of ``histogram`` (a labelled child is fine)."""
        h = FastHistogram(histogram, LATENCY_BUCKETS)
        self._flushers.append(h.flush)
        return h

    def flush(self) -> None:
        for fn in self._flushers:
            fn()

    def exposition(self, openmetrics: bool = False) -> bytes:
        """The Prometheus text format of the whole server (all workers), or
        OpenMetrics (``OPENMETRICS_CONTENT_TYPE``)."""
        self.flush()
        render = om_generate_latest if openmetrics else generate_latest
        if self.multiprocess_dir:
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=self.multiprocess_dir)  # type: ignore[no-untyped-call]
            return render(registry)
        return render(self.registry)


DISPATCH_LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS_CONTENT_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"
