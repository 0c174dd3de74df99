"""Builds the user-activity pipeline from ``Settings``: database, bus,
source outbox, trace log and the stages of the chosen roles (``ingest``:
the publisher; ``relay``; ``store``; ``dispatch``: the dispatcher, when
destinations are configured; every role: the housekeeper).

``App`` (``estat serve``) uses it next to the ingest stages;
``RolesApp`` runs the roles without the HTTP listener (``estat relay``,
``estat store``, ``estat dispatch``, ``estat serve --roles relay,store``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Sequence

from estat.activity.common import TRANSIENT_DB, Spool
from estat.activity.consumer import StoreConsumer
from estat.activity.housekeeper import Housekeeper
from estat.activity.publisher import Publisher
from estat.activity.relay import Relay
from estat.bus.base import Bus, BusError
from estat.bus.memory import MemoryBus
from estat.clock import Clock
from estat.dispatch.destination import Destination
from estat.dispatch.dispatcher import Dispatcher
from estat.dispatch.http import HttpOptions
from estat.dispatch.posthog import PostHog
from estat.dispatch.webhook import Webhook
from estat.errors import Overloaded
from estat.model import EventRecord
from estat.ops.ledger import Ledger
from estat.ops.logging import get_logger
from estat.ops.metrics import Metrics
from estat.pause import Pauses
from estat.retry import RetryPolicy
from estat.settings import Settings
from estat.stage import Stage
from estat.store.db import Database, MigrationBlocked, SchemaTooNew
from estat.store.dispatch import DispatchOutbox
from estat.store.events import EventStore
from estat.store.outbox import ReplayFilter, SourceOutbox
from estat.store.trace import TraceLog

log = get_logger("estat.activity")

ROLES = ("ingest", "relay", "store", "dispatch")


class StartFailed(Exception):
    """The database or the bus could not be prepared; the message says why."""


def parse_roles(text: str | None) -> tuple[str, ...]:
    if not text:
        return ROLES
    roles = tuple(dict.fromkeys(r.strip() for r in text.split(",") if r.strip()))
    bad = [r for r in roles if r not in ROLES]
    if bad or not roles:
        raise ValueError(f"unknown role {bad[0] if bad else ''!r}: roles are {', '.join(ROLES)}")
    return roles


def build_destinations(s: Settings) -> list[Destination]:
    """The destinations of ``DISPATCH_TARGETS`` (validated by ``Settings``)."""
    options: HttpOptions = {
        "connect_timeout": s.dispatch_connect_timeout,
        "read_timeout": s.dispatch_read_timeout,
        "connections": s.dispatch_concurrency * s.dispatch_lane_in_flight,
    }
    out: list[Destination] = []
    for t in s.targets:
        if t == "POSTHOG" and s.posthog_host and s.posthog_api_key:
            out.append(PostHog(s.posthog_host, s.posthog_api_key.get_secret_value(), **options))
        elif t == "WEBHOOK" and s.webhook_url and s.webhook_secret:
            out.append(Webhook(s.webhook_url, s.webhook_secret.get_secret_value(), **options))
    return out


def build_dispatcher(
    s: Settings, db: Database, metrics: Metrics, clock: Clock, pauses: Pauses | None
) -> Dispatcher:
    policy = RetryPolicy(
        base=s.dispatch_retry_base_delay, cap=s.dispatch_retry_max_delay, exponent_cap=10,
        jitter="equal",
    )  # fmt: skip
    outbox = DispatchOutbox(
        db, max_attempts=s.dispatch_max_attempts, lease_seconds=s.dispatch_lease, policy=policy
    )
    return Dispatcher(
        outbox,
        build_destinations(s),
        batch_size=s.dispatch_batch_size,
        poll_interval=s.dispatch_poll_interval,
        concurrency=s.dispatch_concurrency,
        in_flight=s.dispatch_lane_in_flight,
        clock=clock,
        metrics=metrics,
        breaker_threshold=s.dispatch_circuit_failure_threshold,
        open_for=s.dispatch_circuit_open_duration,
        max_open_for=s.dispatch_circuit_max_open_duration,
        pauses=pauses,
    )


def build_bus(s: Settings) -> Bus | None:
    if s.mq_provider == "none":
        return None
    if s.mq_provider == "memory":
        return MemoryBus(capacity=s.mq_memory_capacity, retry_delay=min(s.mq_claim_idle, 5.0))
    # the client libraries are imported only for the bus in use
    if s.mq_provider == "redis-stream":
        from estat.bus.redis_stream import RedisStreamBus

        assert s.mq_redis_url is not None
        return RedisStreamBus(
            s.mq_redis_url.get_secret_value(),
            prefix=s.mq_prefix,
            group=s.mq_consumer_group,
            claim_idle=s.mq_claim_idle,
            entry=s.mq_redis_entry,
        )
    from estat.bus.nats import NatsBus

    assert s.mq_nats_url is not None
    return NatsBus(
        s.mq_nats_url.get_secret_value(),
        prefix=s.mq_prefix,
        group=s.mq_consumer_group,
        claim_idle=s.mq_claim_idle,
    )


class OutboxCommit:
    """The server-events route's writer: rows committed in the source outbox."""

    def __init__(self, outbox: SourceOutbox, metrics: Metrics, on_commit: object) -> None:
        self.outbox = outbox
        self._m = metrics
        self._on_commit = on_commit

    async def commit(self, records: list[EventRecord]) -> tuple[int, int]:
        try:
            res = await self.outbox.db.run(lambda: self.outbox.enqueue(records))
        except TRANSIENT_DB as e:
            self._m.outbox_enqueue.labels("fail").inc(len(records))
            log.error("source outbox write failed", events=len(records), error=str(e)[:300])
            raise Overloaded("the event store is unavailable", 5, kind="store_unavailable") from e
        self._m.outbox_enqueue.labels("inserted").inc(res.inserted)
        if res.duplicates:
            self._m.outbox_enqueue.labels("duplicate").inc(res.duplicates)
        if callable(self._on_commit):
            self._on_commit()
        return res.inserted, res.duplicates


class Activity:
    def __init__(
        self,
        settings: Settings,
        roles: Sequence[str],
        metrics: Metrics,
        clock: Clock,
        pauses: Pauses | None = None,
    ) -> None:
        s = settings
        self.settings = s
        self.roles = tuple(roles)
        self.metrics = metrics
        self.clock = clock
        self.bus = build_bus(s)
        if self.bus is not None:
            lost = metrics.bus_lost.labels(self.bus.provider)
            self.bus.on_lost = lost.inc
        self.db = Database(**s.database_args)
        self.outbox = SourceOutbox(
            self.db, max_attempts=s.outbox_max_attempts, lease_seconds=s.outbox_lease
        )
        topic = self.bus.topic if self.bus else "user-activity"
        provider = self.bus.provider if self.bus else "none"
        self.trace = (
            TraceLog(self.db, s.mq_trace, provider, topic, s.mq_consumer_group)
            if s.mq_trace != "off"
            else None
        )
        self.relay: Relay | None = None
        self.publisher: Publisher | None = None
        self.consumer: StoreConsumer | None = None
        bus = self.bus
        if bus is not None and "relay" in self.roles:
            self.relay = Relay(
                self.outbox,
                bus,
                batch_size=s.outbox_batch_size,
                poll_interval=s.outbox_poll_interval,
                metrics=metrics,
                clock=clock,
                trace=self.trace,
                pauses=pauses,
            )
        if bus is not None and "ingest" in self.roles:
            self.publisher = Publisher(
                bus,
                self.outbox,
                Spool(s.spool_path),
                capacity=s.mq_publish_queue_size,
                batch_size=s.mq_publish_batch_size,
                metrics=metrics,
                clock=clock,
                trace=self.trace,
                on_outbox=self.notify_relay,
            )
        if bus is not None and "store" in self.roles:
            self.consumer = StoreConsumer(
                bus,
                EventStore(self.db, s.targets),
                consumer_name=f"{s.instance_id}-{os.getpid()}",
                batch_size=s.store_batch_size,
                max_deliveries=s.mq_max_deliveries,
                metrics=metrics,
                clock=clock,
                trace=self.trace,
                rescue=lambda records: self.db.run(lambda: self.outbox.enqueue(records)),
                pauses=pauses,
            )
        self.dispatcher: Dispatcher | None = None
        if "dispatch" in self.roles and s.targets:
            self.dispatcher = build_dispatcher(s, self.db, metrics, clock, pauses)
            if self.consumer is not None:
                self.consumer.on_dispatch = self.dispatcher.notify
        self.housekeeper = Housekeeper(
            self.db,
            bus,
            self.trace,
            retention=s.mq_trace_retention,
            metrics=metrics,
            clock=clock,
            targets=s.targets,
            pauses=pauses,
            ages={
                "source_outbox": s.outbox_retention,
                "dispatch_outbox": s.dispatch_retention,
                "audit": s.audit_retention,
                "ledger": s.ledger_retention,
                "lake_objects": s.ledger_retention,
                "manifests": s.ledger_retention,
            },
        )
        self.writer = OutboxCommit(self.outbox, metrics, self.notify_relay)

    async def replay(self, limit: int, which: ReplayFilter) -> tuple[int, int, int]:
        """An operator's outbox replay (the admin API): published now by
        this process's relay, or by a relay made for the call when this
        process runs none."""
        relay = self.relay
        if relay is None:
            if self.bus is None:
                raise BusError("no bus configured")
            relay = Relay(
                self.outbox, self.bus, batch_size=limit, poll_interval=1.0,
                metrics=self.metrics, clock=self.clock, trace=self.trace,
            )  # fmt: skip
        result = await relay.replay(limit, which)
        if self.relay is not None and result[0]:
            self.relay.notify()
        return result

    def count_in(self, ledger: Ledger) -> None:
        """The completeness ledger counts what the store consumer stores and
        what the dispatcher delivers."""
        if self.consumer is not None:
            self.consumer.ledger = ledger
        if self.dispatcher is not None:
            self.dispatcher.ledger = ledger

    def destinations(self) -> dict[str, str]:
        """Each destination's circuit as this process's dispatcher last saw
        it (``closed``, ``open``, ``half_open``), for ``/ready``."""
        d = self.dispatcher
        if d is None:
            return {}
        return {name: b.last.state for name, b in d.breakers.items()}

    def notify_relay(self) -> None:
        if self.relay is not None:
            self.relay.notify()

    async def prepare(self) -> None:
        """Migrate (or check) the schema, declare the bus. Raises ``StartFailed``."""
        db = self.db
        try:
            if self.settings.auto_migrate:
                await db.run(db.upgrade)
            else:
                await db.run(db.check_schema)
                current = await db.run(db.current)
                if current != db.head():
                    raise StartFailed(
                        f"the database schema is at {current}, this estat needs {db.head()}: "
                        "run `estat migrate` (AUTO_MIGRATE=false)"
                    )
        except (SchemaTooNew, MigrationBlocked) as e:
            raise StartFailed(str(e)) from e
        except TRANSIENT_DB as e:
            raise StartFailed(f"database {db.description} unavailable: {str(e)[:300]}") from e
        if self.roles == ("dispatch",):
            if self.dispatcher is None:
                raise StartFailed(
                    "no destination to dispatch to: set POSTHOG_HOST and POSTHOG_API_KEY, "
                    "or WEBHOOK_URL and WEBHOOK_SECRET (DISPATCH_TARGETS)"
                )
            self._log_ready("none")
            return  # the dispatcher needs the database only
        if self.bus is None:
            log.warning("message queue provider is none: skipping user activity publish")
            return
        try:
            await self.bus.start()
        except BusError as e:
            if self.roles == ("ingest",) or "ingest" in self.roles:
                # ingest must not depend on the bus: the outbox absorbs
                log.error("bus unavailable at start: events go to the source outbox", error=str(e))
            else:
                raise StartFailed(f"bus unavailable: {e}") from e
        self._log_ready(self.bus.provider)

    def _log_ready(self, provider: str) -> None:
        # the destinations configured: those this process's store consumer
        # enqueues rows for and its dispatcher (if any) sends to
        log.info(
            "user-activity pipeline ready",
            database=self.db.description,
            provider=provider,
            roles=",".join(self.roles),
            destinations=",".join(self.settings.targets) or "none",
        )

    def layers(self) -> tuple[list[Stage], list[Stage], list[Stage]]:
        """(low: housekeeper, middle: store consumer, high: relay, publisher
        and dispatcher): stopped high first, so the consumer drains what the
        relay and the publisher put on an in-process bus."""
        high: list[Stage] = [
            s for s in (self.publisher, self.relay, self.dispatcher) if s is not None
        ]
        middle: list[Stage] = [self.consumer] if self.consumer is not None else []
        return [self.housekeeper], middle, high

    async def close(self) -> None:
        if self.bus is not None:
            with contextlib.suppress(BusError):
                await self.bus.close()
        await asyncio.to_thread(self.db.close)
