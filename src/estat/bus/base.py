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

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec

TOPIC = "user-activity"


class BusError(Exception):
    """The bus refused or could not be reached."""


class Message(msgspec.Struct, frozen=True, gc=False, array_like=True):
    """(A struct, not a dataclass: built once per published event; packed
    as an array where a provider puts several in one bus message.)"""

    message_id: str
    key: str
    occurred_at: str
    payload: bytes
    headers: dict[str, str] = msgspec.field(default_factory=dict)


@dataclass(slots=True)
class Delivery:
    message: Message
    deliveries: int
    handle: Any = None  # the provider's id for the delivery
    received: float = 0.0  # monotonic time fetched, for the consume latency


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

    async def start(self) -> None:
        """Connect and declare what the bus needs (stream, group)."""

    async def publish(self, messages: Sequence[Message]) -> None: ...

    def consumer(self, name: str) -> Consumer: ...

    async def stats(self) -> BusStats: ...

    async def close(self) -> None: ...


def short(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"[:300]
