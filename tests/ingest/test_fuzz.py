"""Hostile and random bodies: always a 4xx with a code (or 200), never a 5xx,
and nothing from a rejected request reaches the lake."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from estat.app import App
from tests.ingest.helpers import close_all, lake_records, start_app
from tests.ingest.test_events import send


def hostile() -> list[tuple[str, bytes, dict[str, str]]]:
    def ok_batch(props: str) -> bytes:
        return (
            b'{"anonymousId":"h","events":[{"eventId":"hostile","eventName":"ui.page.viewed","properties":'
            + props.encode()
            + b"}]}"
        )

    deep = "[" * 100_000 + "]" * 100_000
    return [
        ("invalid utf-8", b'{"anonymousId":"\xc3\x28","events":[]}', {}),
        ("lone surrogate", ok_batch('{"s":"\\ud800"}'), {}),
        ("nan", ok_batch('{"n":NaN}'), {}),
        ("infinity", ok_batch('{"n":Infinity}'), {}),
        ("deep nesting", ok_batch(deep), {}),
        ("deep object", ok_batch('{"a":' * 5000 + "1" + "}" * 5000), {}),
        ("5000 digits", ok_batch('{"n":' + "9" * 5000 + "}"), {}),
        ("huge float", ok_batch('{"n":1e999}'), {}),
        ("huge string", ok_batch('{"s":"' + "x" * 600_000 + '"}'), {}),
        (
            "duplicate keys",
            b'{"anonymousId":"h","anonymousId":"h2","events":[{"eventId":"hostile","eventId":"x","eventName":"ui.nope"}]}',
            {},
        ),
        ("gzip bomb", gzip.compress(b"[" + b" " * 20_000_000 + b"]"), {"Content-Encoding": "gzip"}),
        ("truncated gzip", gzip.compress(ok_batch("{}"))[:20], {"Content-Encoding": "gzip"}),
        ("gzip header only", b"\x1f\x8b\x08\x00\x00\x00\x00\x00", {"Content-Encoding": "gzip"}),
        ("empty body", b"", {}),
        ("null", b"null", {}),
        ("array", b"[]", {}),
        ("nul bytes", b"\x00" * 100, {}),
    ]


@pytest.fixture
async def app(tmp_path: Path):  # type: ignore[no-untyped-def]
    a = await start_app(tmp_path, analytics_rate_limit_max_requests=100_000)
    yield a
    await close_all()
    if not a.draining:
        await a.shutdown()


@pytest.mark.parametrize(("name", "body", "headers"), hostile(), ids=[h[0] for h in hostile()])
async def test_hostile_bodies(
    app: App, tmp_path: Path, name: str, body: bytes, headers: dict[str, str]
) -> None:
    resp = await send(app, body, headers)
    assert 400 <= resp.status < 500, (name, resp.status, resp.body[:200])
    assert json.loads(resp.body)["code"].startswith(("ANALYTICS_INGEST_", "BODY_TOO_LARGE"))
    await close_all()
    await app.shutdown()
    assert lake_records(tmp_path / "data" / "lake") == []


json_leaf = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20)
)
json_tree = st.recursive(
    json_leaf,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=15,
)
event = st.fixed_dictionaries(
    {},
    optional={
        "eventId": st.one_of(st.text(max_size=70), st.integers()),
        "eventName": st.one_of(
            st.sampled_from(["ui.page.viewed", "ui.tab.changed", "ui.other"]), st.text(max_size=5)
        ),
        "eventVersion": st.one_of(st.none(), st.text(max_size=5)),
        "occurredAt": st.one_of(st.none(), st.text(max_size=30), st.just("2026-01-01T00:00:00Z")),
        "properties": st.one_of(st.none(), json_tree),
    },
)
batch = st.fixed_dictionaries(
    {},
    optional={
        "anonymousId": st.one_of(st.none(), st.text(max_size=10), st.integers()),
        "events": st.lists(event, max_size=4) | json_tree,
    },
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=st.one_of(batch.map(lambda b: json.dumps(b).encode()), st.binary(max_size=200)))
async def test_random_bodies_never_5xx(app: App, body: bytes) -> None:
    resp = await send(app, body)
    assert resp.status == 200 or 400 <= resp.status < 500, (resp.status, resp.body[:300])
    if resp.status != 200:
        assert json.loads(resp.body)["code"].startswith("ANALYTICS_INGEST_")
