"""The client event request, defined once: the decoder and the OpenAPI
document are both built from ``batch_type``.

``{"anonymousId"?: str, "events": [{"eventId": str, "eventName": str,
"eventVersion"?: str, "occurredAt"?: ISO-8601, "properties"?: object}]}``
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

Scalar = None | bool | int | float | str


def nested(depth: int) -> Any:
    """JSON values nesting at most ``depth`` objects/arrays: the decoder
    enforces the properties depth cap while it parses."""
    t: Any = Scalar
    for _ in range(depth - 1):
        t = Scalar | list[t] | dict[str, t]
    return t


EventId = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
EventName = Annotated[str, msgspec.Meta(min_length=1, max_length=100)]
EventVersion = Annotated[str, msgspec.Meta(min_length=1, max_length=32)]
OccurredAt = Annotated[str, msgspec.Meta(max_length=64)]
AnonymousId = Annotated[str, msgspec.Meta(max_length=128)]


MemberId = int | Annotated[str, msgspec.Meta(min_length=1, max_length=64)]


def batch_type(max_depth: int | None, *, server: bool = False) -> Any:
    """The request type: ``ClientBatch`` of ``ClientEvent``. With a
    ``max_depth``, properties nest at most that many levels, enforced by the
    decoder while it parses; with None, properties are any JSON object (the
    OpenAPI document describes the cap in words instead of unrolling it).
    ``server``: the server-event request, which adds ``memberId`` to the
    batch and to each event (the event's wins)."""
    member: list[Any] = [("memberId", MemberId | None, None)] if server else []
    properties: Any = dict[str, nested(max_depth)] if max_depth else dict[str, Any]  # type: ignore[misc]
    event = msgspec.defstruct(
        "ServerEvent" if server else "ClientEvent",
        [
            ("eventId", EventId),
            ("eventName", EventName),
            ("eventVersion", EventVersion | None, None),
            ("occurredAt", OccurredAt | None, None),
            ("properties", properties | None, None),
            *member,
        ],
    )
    return msgspec.defstruct(
        "ServerBatch" if server else "ClientBatch",
        [
            ("events", list[event], msgspec.field(default_factory=list)),  # type: ignore[valid-type]
            ("anonymousId", AnonymousId | None, None),
            *member,
        ],
    )


#: what ``batch_type(...)`` decodes to (a struct made at run time)
ClientBatch = Any
