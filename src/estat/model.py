"""The values that travel through the pipeline. Imports nothing of estat.

A *record* is one accepted event. It is serialised once, at the edge, into
a buffer of JSON Lines; a batch is such a buffer plus its event count, so
later stages move bytes, never per-event objects, and count bytes exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

#: the longest member id estat takes (a JWT ``sub``, a server event's
#: ``memberId``): the store keeps it whole (``user_activity_event.member_key``)
MEMBER_ID_MAX = 255


@dataclass(slots=True)
class Batch:
    """Records cut by the batcher, bound for one lake object.

    ``key`` is chosen once, when the batch is cut, and never changes: every
    retry (and later every DLQ re-upload) writes the same key, so a retry
    overwrites identical bytes instead of creating a second object.
    """

    key: str
    data: bytes | bytearray  # JSON Lines, every line ending in "\n"
    events: int
    first_ts: int
    last_ts: int

    @property
    def nbytes(self) -> int:
        return len(self.data)


@dataclass(frozen=True, slots=True)
class EncodedBatch:
    """A batch encoded as one gzip JSON Lines object, ready to PUT."""

    key: str
    data: bytes
    events: int
    raw_bytes: int
    first_ts: int
    last_ts: int
    metadata: dict[str, str] = field(default_factory=dict)
    sha256: str = ""  # of ``data`` (the completeness ledger's manifests)


class EventRecord(msgspec.Struct, gc=False):
    """One accepted event: *the* event of estat. It is the line of the
    ``events`` lake dataset, and what the bus, the event store and the
    destinations derive from."""

    event_id: str
    event_name: str
    event_version: str
    occurred_at: str
    received_at: str
    member_id: str | None
    anonymous_id: str | None
    properties: msgspec.Raw
    source: str
    ip: str
    user_agent: str
