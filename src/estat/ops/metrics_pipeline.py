"""The metrics of the user-activity pipeline (seed 004's names in their
Prometheus spelling), dispatch, the admin listener, the completeness
ledger, retention and the host; ``Metrics`` (``metrics.py``) declares them
through ``PipelineMetrics._declare_pipeline``."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

DISPATCH_LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)


class PipelineMetrics:
    def _declare_pipeline(
        self, counter: Callable[..., Counter], gauge: Callable[..., Gauge], r: CollectorRegistry
    ) -> None:
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
        self.dispatch_discarded = counter(
            "dispatch_rows_discarded_total",
            "Dispatch outbox rows still to be sent that an operator discarded, by target (one "
            "no longer configured); the events stay in the store.",
            ("target",),
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
        self.dispatch_in_flight = gauge(
            "dispatch_requests_in_flight",
            "Requests to a destination awaiting their answer, by target (at most "
            "DISPATCH_CONCURRENCY x DISPATCH_LANE_IN_FLIGHT per dispatcher process).",
            ("target",),
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
            "Source outbox rows by status (PENDING, FAILED, PARKED every 10 s; PUBLISHED every "
            "10 min); PARKED are FAILED rows with no next retry.",
            ("status",),
            mode="livemostrecent",
        )
        self.source_outbox_oldest_due = gauge(
            "source_outbox_oldest_due_age_seconds",
            "Age of the oldest source outbox row that is due now (waiting for a relay to "
            "publish it); 0 when none is.",
            (),
            mode="livemostrecent",
        )
        self.dispatch_outbox_rows = gauge(
            "dispatch_outbox_rows",
            "Dispatch outbox rows by status (PENDING, FAILED, PARKED every 10 s; DISPATCHED "
            "every 10 min) and target; PARKED are FAILED rows with no next retry.",
            ("status", "target"),
            mode="livemostrecent",
        )
        self.bus_pending = gauge(
            "mq_pending_messages",
            "Messages published and not yet acked by the store consumers' group.",
            ("topic", "provider"),
            mode="livemostrecent",
        )
        self.bus_lost = counter(
            "mq_bus_lost_total",
            "Times a store consumer or publisher found the bus's stream or consumer group "
            "gone and declared it again: the bus lost its data (a Redis restarted without "
            "an append-only file, a deleted stream); what it held unread is not on the bus.",
            ("provider",),
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
