"""NATS JetStream (``MQ_PROVIDER=nats``).

Stream ``<PREFIX>_USER_ACTIVITY`` on subject ``<prefix>.user-activity``,
*interest* retention (a message stays until every consumer has acked it);
one durable pull consumer per group (``MQ_CONSUMER_GROUP``), declared by
publisher and consumer alike so that nothing published before the first
consumer starts is dropped. Acks after commit; a retry is a nak with delay;
after ``MQ_MAX_DELIVERIES`` the message is published to the parked stream
(``<PREFIX>_USER_ACTIVITY_DLQ``, limits retention) and acked. A message not
acked within ``MQ_CLAIM_IDLE`` (a consumer died) is delivered again.
``Nats-Msg-Id`` is the event id, so JetStream drops a republished message
within its duplicate window.

A stream or durable consumer that is gone (deleted, or a server that lost
its JetStream storage) is declared again, and said so, by the first to
notice: a publish that finds no stream (it would fail until then, every
event going to the source outbox), or a consumer whose idle pulls find its
durable consumer missing (an interest stream with no consumer keeps
nothing: what is published then is dropped).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import nats
from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeout
from nats.js import api
from nats.js.errors import NoStreamResponseError, NotFoundError

from estat.bus.base import (
    TOPIC,
    BusError,
    BusStats,
    Delivery,
    Message,
    ParkedMessage,
    message_of,
    message_of_line,
    short,
)
from estat.model import EventRecord
from estat.ops.logging import get_logger

log = get_logger("estat.bus")

CHECK_CONSUMER_EVERY = 10.0  # seconds of idle pulls between checks that the consumer exists


def _parked_message(data: bytes, headers: dict[str, str]) -> Message:
    """The message of a parked copy: from its event JSON, else its headers."""
    return message_of_line(data) or Message(
        headers.get("messageId", ""), headers.get("key", ""), "", data, {}
    )


# A server that stops answering (its host frozen or replaced by a failover,
# no reset sent) is found by the client's pings only: nats-py's defaults (every
# 2 minutes, 2 unanswered) keep every publish and fetch timing out on the dead
# connection for 4 to 6 minutes before it reconnects. Every 10 s, 3
# unanswered: 30 to 40 s.
PING_INTERVAL = 10.0
MAX_OUTSTANDING_PINGS = 3


class NatsBus:
    provider = "nats"

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "estat",
        group: str = "estat-store",
        claim_idle: float = 60.0,
        retry_delay: float = 5.0,
        timeout: float = 5.0,
        ping_interval: float = PING_INTERVAL,
    ) -> None:
        self.topic = TOPIC
        self.ping_interval = ping_interval
        self.url = url
        self.subject = f"{prefix}.{TOPIC}"
        self.dlq_subject = f"{prefix}.{TOPIC}-dlq"
        base = re.sub(r"[^A-Za-z0-9_-]", "_", f"{prefix}_{TOPIC}").upper()
        self.stream = base
        self.dlq_stream = base + "_DLQ"
        self.group = re.sub(r"[^A-Za-z0-9_-]", "_", group)
        self.claim_idle = claim_idle
        self.retry_delay = retry_delay
        self.timeout = timeout
        self._nc: Any = None
        self._js: Any = None
        self._erring = False  # a connection error was logged; quiet until reconnected
        self.on_lost: Callable[[], None] | None = None
        self._declaring = asyncio.Lock()

    async def _connect(self) -> Any:
        if self._js is None:
            try:
                # bounded: nats-py retries a first connection as often as a reconnection
                self._nc = await asyncio.wait_for(
                    nats.connect(
                        self.url,
                        connect_timeout=self.timeout,
                        max_reconnect_attempts=-1,
                        reconnect_time_wait=1,
                        allow_reconnect=True,
                        error_cb=self._on_error,
                        disconnected_cb=self._on_disconnected,
                        reconnected_cb=self._on_reconnected,
                        ping_interval=self.ping_interval,
                        max_outstanding_pings=MAX_OUTSTANDING_PINGS,
                    ),
                    self.timeout * 2,
                )
            except (TimeoutError, NatsError, OSError) as e:
                raise BusError(short(e)) from e
            self._js = self._nc.jetstream(timeout=self.timeout)
        return self._js

    # nats-py's own callbacks log a traceback per failed reconnection
    # attempt (one a second) in plain text: one structured line per outage
    async def _on_error(self, e: Exception) -> None:
        if not self._erring:
            self._erring = True
            log.warning("bus: NATS connection error, reconnecting", error=short(e))

    async def _on_disconnected(self) -> None:
        log.warning("bus: disconnected from NATS", url=self.url)

    async def _on_reconnected(self) -> None:
        self._erring = False
        log.info("bus: reconnected to NATS", url=self.url)

    async def start(self) -> None:
        js = await self._connect()
        try:
            await _ensure_stream(js, self.stream, [self.subject], api.RetentionPolicy.INTEREST)
            await _ensure_stream(
                js, self.dlq_stream, [self.dlq_subject], api.RetentionPolicy.LIMITS
            )
            await js.add_consumer(
                self.stream,
                api.ConsumerConfig(
                    durable_name=self.group,
                    ack_policy=api.AckPolicy.EXPLICIT,
                    ack_wait=self.claim_idle,
                    max_deliver=-1,
                    filter_subject=self.subject,
                    max_ack_pending=20_000,
                ),
            )
        except (TimeoutError, NatsError, OSError) as e:
            raise BusError(short(e)) from e

    async def publish_events(self, records: Sequence[EventRecord], lines: Sequence[bytes]) -> None:
        await self.publish([message_of(r, line) for r, line in zip(records, lines, strict=True)])

    async def publish(self, messages: Sequence[Message], dedup_suffix: str = "") -> None:
        """``dedup_suffix``: appended to ``Nats-Msg-Id`` (a requeue must not
        be dropped as a duplicate of the original publish)."""
        js = await self._connect()

        async def one(m: Message) -> None:
            headers = {
                "Nats-Msg-Id": m.message_id + dedup_suffix,
                "messageId": m.message_id,
                "key": m.key,
                "occurredAt": m.occurred_at,
                **{"header." + k: v for k, v in m.headers.items()},
            }
            await js.publish(self.subject, m.payload, headers=headers, timeout=self.timeout)

        try:
            try:
                await asyncio.gather(*(one(m) for m in messages))
            except NoStreamResponseError:
                await self.declare_again("no stream answered a publish")
                await asyncio.gather(*(one(m) for m in messages))  # once; duplicates dropped
        except (TimeoutError, NatsError, OSError) as e:
            raise BusError(short(e)) from e

    async def declare_again(self, why: str) -> None:
        """The stream or the durable consumer is gone: declare both again
        (once: the publishes in flight and the consumer may all notice)."""
        async with self._declaring:
            js = await self._connect()
            try:
                await js.stream_info(self.stream)
                await js.consumer_info(self.stream, self.group)
                return  # declared meanwhile
            except NotFoundError:
                pass
            log.error(
                "bus: the stream or its consumer was gone; declared again",
                stream=self.stream,
                group=self.group,
                why=why,
                hint="deleted, or a NATS server without its JetStream storage: messages it "
                "held unread are not on the bus (they are in the lake); "
                "see docs/runbook.md, 'The bus lost its data'",
            )
            if self.on_lost is not None:
                self.on_lost()
            await self.start()

    async def parked(self, limit: int) -> list[ParkedMessage]:
        js = await self._connect()
        out: list[ParkedMessage] = []
        try:
            info = await js.stream_info(self.dlq_stream)
            seq = int(info.state.first_seq)
            last = int(info.state.last_seq)
            while seq <= last and len(out) < limit:
                try:
                    raw = await js.get_msg(self.dlq_stream, seq)
                except NotFoundError:
                    seq += 1
                    continue
                h = raw.headers or {}
                m = _parked_message(raw.data or b"", h)
                out.append(
                    ParkedMessage(str(seq), m, h.get("error", ""), int(h.get("deliveries", "0")))
                )
                seq += 1
        except (TimeoutError, NatsError, OSError) as e:
            raise BusError(short(e)) from e
        return out

    async def requeue(self, ids: Sequence[str]) -> int:
        js = await self._connect()
        found = 0
        for pid in ids:
            if not pid.isdigit():
                continue  # not an id of this bus
            try:
                raw = await js.get_msg(self.dlq_stream, int(pid))
            except NotFoundError:
                continue
            except (TimeoutError, NatsError, OSError) as e:
                raise BusError(short(e)) from e
            m = _parked_message(raw.data or b"", raw.headers or {})
            await self.publish([m], dedup_suffix=f":requeued:{pid}")
            try:
                await js.delete_msg(self.dlq_stream, int(pid))
            except (TimeoutError, NatsError, OSError) as e:
                raise BusError(short(e)) from e
            found += 1
        return found

    def consumer(self, name: str) -> NatsConsumer:
        return NatsConsumer(self)

    async def stats(self) -> BusStats:
        js = await self._connect()
        try:
            info = await js.consumer_info(self.stream, self.group)
            dlq = await js.stream_info(self.dlq_stream)
        except (TimeoutError, NatsError, OSError) as e:
            raise BusError(short(e)) from e
        return BusStats(int(info.num_pending + info.num_ack_pending), int(dlq.state.messages))

    async def close(self) -> None:
        if self._nc is not None:
            try:
                await self._nc.drain()
            except (TimeoutError, NatsError, OSError):
                await self._nc.close()
            self._nc = self._js = None


async def _ensure_stream(
    js: Any, name: str, subjects: list[str], retention: api.RetentionPolicy
) -> None:
    try:
        await js.stream_info(name)
    except NotFoundError:
        await js.add_stream(
            api.StreamConfig(
                name=name,
                subjects=subjects,
                retention=retention,
                storage=api.StorageType.FILE,
                duplicate_window=120,
            )
        )


def _message(msg: Any) -> Message:
    h = msg.headers or {}
    return Message(
        h.get("messageId", ""),
        h.get("key", ""),
        h.get("occurredAt", ""),
        msg.data,
        {k[7:]: v for k, v in h.items() if k.startswith("header.")},
    )


class NatsConsumer:
    def __init__(self, bus: NatsBus) -> None:
        self.bus = bus
        self._sub: Any = None
        self._next_check = time.monotonic() + CHECK_CONSUMER_EVERY

    async def _subscription(self) -> Any:
        if self._sub is None:
            b = self.bus
            js = await b._connect()
            try:
                self._sub = await js.pull_subscribe_bind(b.group, b.stream)
            except (TimeoutError, NatsError, OSError) as e:
                raise BusError(short(e)) from e
        return self._sub

    async def fetch(self, max_messages: int, timeout: float) -> list[Delivery]:
        sub = await self._subscription()
        try:
            msgs = await sub.fetch(max_messages, timeout=max(timeout, 0.05))
        except NatsTimeout:
            await self._check_consumer()
            return []
        except (TimeoutError, NatsError, OSError) as e:
            raise BusError(short(e)) from e
        t = time.monotonic()
        return [Delivery(_message(m), int(m.metadata.num_delivered), m, t) for m in msgs]

    async def _check_consumer(self) -> None:
        """Pulls on a deleted consumer time out like idle ones: now and then
        an idle consumer asks whether it still exists."""
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + CHECK_CONSUMER_EVERY
        b = self.bus
        js = await b._connect()
        try:
            try:
                await js.consumer_info(b.stream, b.group)
            except NotFoundError:
                await b.declare_again("the durable consumer was not found")
        except (TimeoutError, NatsError, OSError) as e:
            raise BusError(short(e)) from e

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        # acks confirmed by the server (concurrently): once ``ack`` returns,
        # the messages are not delivered again
        try:
            await asyncio.gather(*(d.handle.ack_sync(timeout=self.bus.timeout) for d in deliveries))
        except (TimeoutError, NatsError, OSError) as e:
            raise BusError(short(e)) from e

    async def retry(self, delivery: Delivery, error: str) -> None:
        try:
            await delivery.handle.nak(delay=self.bus.retry_delay)
        except (TimeoutError, NatsError, OSError) as e:
            raise BusError(short(e)) from e

    async def park(self, delivery: Delivery, error: str) -> None:
        b = self.bus
        js = await b._connect()
        m = delivery.message
        try:
            await js.publish(
                b.dlq_subject,
                m.payload,
                headers={
                    "messageId": m.message_id,
                    "key": m.key,
                    "error": error[:1000].replace("\r", " ").replace("\n", " "),
                    "deliveries": str(delivery.deliveries),
                    "group": b.group,
                },
            )
            await delivery.handle.ack_sync(timeout=b.timeout)
        except (TimeoutError, NatsError, OSError) as e:
            raise BusError(short(e)) from e

    def interrupt(self) -> None:
        """A pull waits on the server: it ends at its timeout."""

    async def close(self) -> None:
        """Unacked messages are delivered again after ``MQ_CLAIM_IDLE``."""
        if self._sub is not None:
            with contextlib.suppress(TimeoutError, NatsError, OSError):
                await self._sub.unsubscribe()
            self._sub = None
