"""The PostHog destination against a PostHog-compatible capture server on a
free port: mapping, per-event outcomes, bisecting of refused batches."""

from __future__ import annotations

import json
import uuid

import msgspec
import pytest

from estat.dispatch.posthog import NAMESPACE, PostHog, capture_event, event_uuid
from estat.model import EventRecord
from tests.capture import CaptureServer
from tests.conftest import free_port


def ev(
    member: str | None = None, event_id: str | None = None, props: bytes = b'{"plan":"pro"}'
) -> EventRecord:
    return EventRecord(
        event_id or uuid.uuid4().hex, "order.completed", "2", "2026-12-01T10:00:00.000Z",
        "2026-12-01T10:00:00.100Z", member, "anon-7", msgspec.Raw(props), "SERVER", "10.0.0.1", "ua",
    )  # fmt: skip


async def test_events_arrive_mapped_once_with_a_stable_uuid(capture: CaptureServer) -> None:
    ph = PostHog(capture.url, "phc_test")
    events = [ev(member="42"), ev(), ev(event_id="order-9f1c")]
    outcomes = await ph.send(events)
    assert [o.kind for o in outcomes] == ["delivered"] * 3
    got = {e["uuid"]: e for e in capture.accepted}
    first = got[str(uuid.UUID(events[0].event_id))]
    assert first["distinct_id"] == "42"  # the member, never the event id
    assert first["event"] == "order.completed"
    assert first["timestamp"] == "2026-12-01T10:00:00.000Z"
    assert first["properties"] == {
        "plan": "pro", "event_id": events[0].event_id, "event_version": "2",
        "occurred_at": "2026-12-01T10:00:00.000Z", "source": "SERVER", "$lib": "estat",
    }  # fmt: skip
    assert got[event_uuid(events[1].event_id)]["distinct_id"] == "anon-7"
    # an id that is not a UUID: a UUID v5 of it, the same on every retry and replay
    assert event_uuid("order-9f1c") == str(uuid.uuid5(NAMESPACE, "order-9f1c"))
    assert event_uuid("order-9f1c") in got
    await ph.close()


@pytest.mark.parametrize(
    ("props", "theirs"),
    [
        (b"{}", {}),
        (b" { } ", {}),
        (b'{"a": [1, {"b": "}"}] }', {"a": [1, {"b": "}"}]}),
        (b'{"source":"forged","$lib":"x","n":1}', {"n": 1}),  # estat's keys win
    ],
)
def test_properties_are_spliced_with_estats_keys_last(
    props: bytes, theirs: dict[str, object]
) -> None:
    e = ev(props=props)
    body = json.loads(msgspec.json.encode(capture_event(e)))
    assert body["properties"] == {
        **theirs, "event_id": e.event_id, "event_version": "2",
        "occurred_at": "2026-12-01T10:00:00.000Z", "source": "SERVER", "$lib": "estat",
    }  # fmt: skip


async def test_a_large_batch_is_gzipped(capture: CaptureServer) -> None:
    ph = PostHog(capture.url, "phc_test", gzip_above=1000)
    assert {o.kind for o in await ph.send([ev() for _ in range(50)])} == {"delivered"}
    assert capture.gzipped == 1
    assert len(capture.accepted) == 50
    await ph.close()


async def test_a_refused_event_is_isolated_and_the_rest_delivered(capture: CaptureServer) -> None:
    ph = PostHog(capture.url, "phc_test")
    events = [ev() for _ in range(16)]
    bad = {event_uuid(events[3].event_id), event_uuid(events[11].event_id)}
    capture.bad_uuids = bad
    outcomes = await ph.send(events)
    rejected = [events[i].event_id for i, o in enumerate(outcomes) if o.kind == "rejected"]
    assert rejected == [events[3].event_id, events[11].event_id]
    assert all("HTTP 400" in o.reason for o in outcomes if o.kind == "rejected")
    assert sorted(capture.uuids()) == sorted(
        event_uuid(e.event_id) for e in events if event_uuid(e.event_id) not in bad
    )
    await ph.close()


async def test_413_splits_the_batch_until_it_fits(capture: CaptureServer) -> None:
    capture.max_batch = 3
    ph = PostHog(capture.url, "phc_test")
    outcomes = await ph.send([ev() for _ in range(10)])
    assert {o.kind for o in outcomes} == {"delivered"}
    assert len(capture.accepted) == 10
    await ph.close()


@pytest.mark.parametrize(
    ("status", "config_error"), [(429, False), (500, False), (503, False), (401, True), (403, True)]
)
async def test_retryable_answers_retry_every_event(
    capture: CaptureServer, status: int, config_error: bool
) -> None:
    capture.status = status
    capture.retry_after = 7 if status == 429 else 0
    ph = PostHog(capture.url, "phc_test")
    outcomes = await ph.send([ev() for _ in range(4)])
    assert {o.kind for o in outcomes} == {"retry"}
    assert all(o.config_error is config_error for o in outcomes)
    assert all(o.not_before == (7.0 if status == 429 else 0.0) for o in outcomes)
    assert capture.requests == 1  # never bisected
    assert capture.accepted == []
    await ph.close()


async def test_connection_refused_and_timeouts_are_retries(capture: CaptureServer) -> None:
    ph = PostHog(
        f"http://127.0.0.1:{free_port()}", "phc_test", connect_timeout=0.5, read_timeout=0.5
    )
    outcomes = await ph.send([ev(), ev()])
    assert [o.kind for o in outcomes] == ["retry", "retry"]
    assert outcomes[0].reason.startswith("connection")
    await ph.close()
    capture.hang = 2.0  # longer than the read timeout
    ph = PostHog(capture.url, "phc_test", connect_timeout=0.5, read_timeout=0.3)
    outcomes = await ph.send([ev(), ev()])
    assert [o.kind for o in outcomes] == ["retry", "retry"]
    assert outcomes[0].reason.startswith("timeout")
    # (the server may still take that batch after the client gave up: the
    # retry carries the same uuids, which PostHog deduplicates)
    await ph.close()


@pytest.mark.parametrize(
    "event_id",
    [
        "0f8fad5b-d9cb-469f-a165-70867728950e",
        "0F8FAD5BD9CB469FA16570867728950E",
        "{0f8fad5b-d9cb-469f-a165-70867728950e}",
        "urn:uuid:0f8fad5b-d9cb-469f-a165-70867728950e",
        "order-9f1c",
        "0f8fad5b-d9cb-469f-a165-70867728950",  # one digit short: not a UUID
        "",
    ],
)
def test_event_uuid_is_the_uuid_or_a_v5_of_the_id(event_id: str) -> None:
    try:
        want = str(uuid.UUID(event_id))
    except ValueError:
        want = str(uuid.uuid5(NAMESPACE, event_id))
    assert event_uuid(event_id) == want
