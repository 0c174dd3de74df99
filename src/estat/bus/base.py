"""The bus seam.

A ``Message`` is one event (its id, partition key, time and JSON payload).
``Bus.publish`` hands a batch to the bus or raises ``BusError`` (then none,
some or all of it may be on the bus: the store is idempotent by event id, so
publishing again is safe). A ``Consumer`` of a group fetches ``Delivery``
values and settles each exactly one way:

- ``ack``: stored; the bus forgets it (for this group);
- ``retry``: not stored this time; the bus delivers it again later (Redis:
  once it has been idle ``MQ_CLAIM_IDLE``; NATS: after a nak delay);
- ``park``: given up (``MQ_MAX_DELIVERIES`` reached): moved to the parked
  list (``<stream>:dlq``) with its last error, and acked.

A delivery not settled (the consumer died) is delivered again to a live
consumer of the group. ``Delivery.deliveries`` counts deliveries, this one
included.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec

from estat.model import EventRecord

TOPIC = "user-activity"


class BusError(Exception):
    """The bus refused or could not be reached."""


class Message(msgspec.Struct, frozen=True, gc=False):
    """(A struct, not a dataclass: built once per published event.)"""

    message_id: str
    key: str
    occurred_at: str
    payload: bytes
    headers: dict[str, str] = msgspec.field(default_factory=dict)


def key_of(rec: EventRecord) -> str:
    """The partition key: the member, else the anonymous visitor, else the event."""
    return rec.member_id or rec.anonymous_id or rec.event_id


def message_of(rec: EventRecord, payload: bytes) -> Message:
    """The bus message of an event; ``payload`` is its JSON (``rows.encode``)."""
    return Message(
        rec.event_id,
        rec.member_id or rec.anonymous_id or rec.event_id,
        rec.occurred_at,
        payload,
        {"source": rec.source, "eventName": rec.event_name},
    )


class _Head(msgspec.Struct, gc=False):
    """What a message is derived from in an event's JSON."""

    event_id: str
    event_name: str = ""
    occurred_at: str = ""
    member_id: str | int | None = None
    anonymous_id: str | None = None
    source: str = ""


_head = msgspec.json.Decoder(_Head).decode


def message_of_line(line: bytes) -> Message | None:
    """The message of an event's JSON, as ``message_of`` builds it; None
    when ``line`` is not an event (then it cannot travel as a bare line)."""
    try:
        h = _head(line)
    except msgspec.DecodeError:
        return None
    member = None if h.member_id is None else str(h.member_id)
    return Message(
        h.event_id,
        member or h.anonymous_id or h.event_id,
        h.occurred_at,
        line,
        {"source": h.source, "eventName": h.event_name},
    )


@dataclass(slots=True)
class Delivery:
    message: Message
    deliveries: int
    handle: Any = None  # the provider's id for the delivery
    received: float = 0.0  # monotonic time fetched, for the consume latency


@dataclass(frozen=True, slots=True)
class ParkedMessage:
    """A message given up on (``park``): what an operator lists and requeues."""

    id: str  # the provider's id of the parked copy
    message: Message
    error: str
    deliveries: int


@dataclass(frozen=True, slots=True)
class BusStats:
    pending: int  # published, not yet acked by the group (read or not)
    parked: int


class Consumer(Protocol):
    async def fetch(self, max_messages: int, timeout: float) -> list[Delivery]: ...

    async def ack(self, deliveries: Sequence[Delivery]) -> None: ...

    async def retry(self, delivery: Delivery, error: str) -> None: ...

    async def park(self, delivery: Delivery, error: str) -> None: ...

    def interrupt(self) -> None:
        """Make a ``fetch`` waiting for messages return early (a stop).
        Providers whose read blocks on the server let it end at its timeout."""

    async def close(self) -> None: ...


class Bus(Protocol):
    provider: str
    topic: str
    #: called when the bus is found to have lost its stream or group (and
    #: declared them again): what it held unread is gone from the bus
    on_lost: Callable[[], None] | None

    async def start(self) -> None:
        """Connect and declare what the bus needs (stream, group)."""

    async def publish(self, messages: Sequence[Message]) -> None: ...

    async def publish_events(self, records: Sequence[EventRecord], lines: Sequence[bytes]) -> None:
        """Publish events given with their JSON (one line each, no newline):
        the same as ``publish`` of their ``message_of``, which a provider
        may skip building (Redis batch entries carry the lines as they are)."""

    def consumer(self, name: str) -> Consumer: ...

    async def parked(self, limit: int) -> list[ParkedMessage]:
        """The oldest ``limit`` parked messages."""
        ...

    async def requeue(self, ids: Sequence[str]) -> int:
        """Publish these parked messages again (their delivery count starts
        over) and remove them from the parked list; how many were found."""
        ...

    async def stats(self) -> BusStats: ...

    async def close(self) -> None: ...


def short(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"[:300]
