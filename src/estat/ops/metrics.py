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
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.openmetrics.exposition import generate_latest as om_generate_latest

from estat.ops.hist import FastHistogram
from estat.ops.metrics_pipeline import DISPATCH_LATENCY_BUCKETS as DISPATCH_LATENCY_BUCKETS
from estat.ops.metrics_pipeline import PipelineMetrics

# Every process exposes the same series: ``estat serve``'s multiprocess
# collector has no ``*_created`` samples, so a single process (``estat
# store``, ``estat relay``…) must not add one per counter either.
disable_created_metrics()  # type: ignore[no-untyped-call]

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


class Metrics(PipelineMetrics):
    """The metric objects, on an injectable registry (the user-activity
    pipeline's, dispatch's, the admin listener's and the host's are declared
    in ``metrics_pipeline.py``)."""

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

        self._declare_pipeline(counter, gauge, r)

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


CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS_CONTENT_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"
