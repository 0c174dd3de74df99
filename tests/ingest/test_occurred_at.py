"""``occurredAt`` over its whole grammar: an answer is 200 or a 400 naming
the field, never a 5xx (dates whose UTC instant overflows included)."""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from estat.app import App
from tests.fakes import MemorySink
from tests.ingest.helpers import start_app


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    tmp = tmp_path_factory.mktemp("occurred")
    app: App = asyncio.run_coroutine_threadsafe(
        start_app(tmp, sink=MemorySink(), analytics_rate_limit_max_requests=10**6), loop
    ).result(30)
    assert app.address is not None
    yield app.address
    asyncio.run_coroutine_threadsafe(app.shutdown(), loop).result(60)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


def post(addr: tuple[str, int], occurred: str) -> tuple[int, dict[str, str]]:
    body = json.dumps(
        {
            "anonymousId": "a-1",
            "events": [{"eventId": "e-1", "eventName": "ui.page.viewed", "occurredAt": occurred}],
        }
    )
    c = http.client.HTTPConnection(*addr, timeout=10)
    try:
        c.request("POST", "/api/v1/analytics/events", body, {"Content-Type": "application/json"})
        r = c.getresponse()
        return r.status, json.loads(r.read() or b"{}")
    finally:
        c.close()


EDGES = [
    "9999-12-31T23:59:59-14:00",
    "0001-01-01T00:00:00+05:00",
    "9999-12-31T23:59:59.999999-00:01",
    "0001-01-01T00:00:00+23:59",
    "2026-02-30T00:00:00Z",
    "2026-01-01T24:00:00Z",
    "2026-01-01T00:00:00+24:00",
]


@pytest.mark.parametrize("value", EDGES)
def test_edges_are_400_invalid_event(server: tuple[str, int], value: str) -> None:
    status, body = post(server, value)
    assert status == 400, (value, body)
    assert body["code"] == "ANALYTICS_INGEST_INVALID_EVENT"
    assert "occurredAt" in body["message"]


def iso_like() -> st.SearchStrategy[str]:
    year = st.integers(0, 10000).map(lambda y: f"{y:04d}")
    two = st.integers(0, 99).map(lambda n: f"{n:02d}")
    frac = st.one_of(st.just(""), st.integers(0, 999999).map(lambda f: f".{f:06d}"))
    offset = st.one_of(
        st.just(""),
        st.just("Z"),
        st.tuples(st.sampled_from("+-"), two, two).map(lambda t: f"{t[0]}{t[1]}:{t[2]}"),
    )
    sep = st.sampled_from(["T", " ", "t"])
    return st.builds(
        lambda y, mo, d, s, h, mi, se, f, o: f"{y}-{mo}-{d}{s}{h}:{mi}:{se}{f}{o}",
        year, two, two, sep, two, two, two, frac, offset,
    )  # fmt: skip


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.one_of(iso_like(), st.text(max_size=40)))
def test_no_occurred_at_is_a_5xx(server: tuple[str, int], value: str) -> None:
    status, body = post(server, value)
    assert status in (200, 400), (value, status, body)
    if status == 400:
        assert body["code"] in (
            "ANALYTICS_INGEST_INVALID_EVENT",
            "ANALYTICS_INGEST_INVALID_BODY",
        ) or (body["code"].startswith("ANALYTICS_INGEST_"))
