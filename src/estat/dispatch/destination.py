"""The destinations seam.

A destination takes a batch of stored events and returns one ``Outcome``
per event, in order:

- ``delivered``;
- ``retry``: not this time (a timeout, a 5xx, a 429), with an optional
  ``not_before`` (seconds from now: a ``Retry-After``); ``config_error``
  marks a refusal of the credentials (401 / 403), which is retried but
  never parked: the events are fine, the configuration is not;
- ``rejected``: the destination will never take this event (it was
  isolated from the rest of its batch); parked with the reason.

A destination never raises for what the remote side did; an exception is a
bug in the destination, and the dispatcher treats it as ``retry``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from estat.model import EventRecord

Kind = Literal["delivered", "retry", "rejected"]


@dataclass(frozen=True, slots=True)
class Outcome:
    kind: Kind
    reason: str = ""
    not_before: float = 0.0
    config_error: bool = False


DELIVERED = Outcome("delivered")


def retry_all(
    n: int, reason: str, not_before: float = 0.0, config_error: bool = False
) -> list[Outcome]:
    o = Outcome("retry", reason[:1000], not_before, config_error)
    return [o] * n


class Destination(Protocol):
    name: str  # the dispatch_target value, e.g. POSTHOG

    async def send(self, events: Sequence[EventRecord]) -> list[Outcome]: ...

    async def close(self) -> None: ...
