"""HTTP/1.1 conformance of the ingest listener (RFC 9112), one table.

Each row is raw bytes on a fresh connection and what must come back: the
status (None: no answer at all), whether the server closes the connection
after it, and how many records reach the lake (a request that is refused
never reaches a sink). Request smuggling variants are here too: llhttp
rejects them and they must stay rejected.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import pytest

from estat.app import App
from tests.ingest.helpers import connect, lake_records, read_response


def chunked(body: bytes, trailer: bytes = b"") -> bytes:
    return b"%x\r\n%s\r\n0\r\n%s\r\n" % (len(body), body, trailer)


POST = b"POST /collect HTTP/1.1\r\nHost: x\r\n"
CASES: list[tuple[str, bytes, int | None, bool, int]] = [
    # (name, request, status, closed after, records stored)
    ("plain", POST + b"Content-Length: 2\r\n\r\nok", 200, False, 1),
    ("no host in HTTP/1.1", b"GET /collect?a=1 HTTP/1.1\r\n\r\n", 400, True, 0),
    ("two hosts", b"GET /collect?a=1 HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, True, 0),
    ("no host in HTTP/1.0 is fine", b"GET /collect?a=1 HTTP/1.0\r\n\r\n", 200, True, 1),
    (
        "101 header fields",
        b"GET /collect?a=1 HTTP/1.1\r\nHost: x\r\n" + b"X-A: 1\r\n" * 100 + b"\r\n",
        431,
        True,
        0,
    ),
    (
        "100 header fields are fine",
        b"GET /collect?a=1 HTTP/1.1\r\nHost: x\r\n" + b"X-A: 1\r\n" * 99 + b"\r\n",
        200,
        False,
        1,
    ),
    (
        "a coding other than chunked",
        POST + b"Transfer-Encoding: gzip, chunked\r\n\r\n" + chunked(b"xx"),
        501,
        True,
        0,
    ),
    (
        "codings over two lines",
        POST + b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(b"xx"),
        501,
        True,
        0,
    ),
    (
        "HTTP/1.0 with Transfer-Encoding closes after the message",
        b"POST /collect HTTP/1.0\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n"
        + chunked(b"ok"),
        200,
        True,
        1,
    ),
    (
        "trailers are counted against the head limit",
        POST
        + b"Transfer-Encoding: chunked\r\n\r\n"
        + chunked(b"ok", b"X-Big: " + b"a" * 3000 + b"\r\n"),
        431,
        True,
        0,
    ),
    # smuggling variants llhttp rejects
    (
        "CL and TE",
        POST + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(b"xx"),
        400,
        True,
        0,
    ),
    ("two lengths", POST + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\nabc", 400, True, 0),
    (
        "bad chunk size",
        POST + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n",
        400,
        True,
        0,
    ),
    ("obs-fold", POST + b"Content-Length: 2\r\nX-A: a\r\n b\r\n\r\nok", 400, True, 0),
    ("bare LF line end", b"GET /collect?a=1 HTTP/1.1\nHost: x\n\n", 400, True, 0),
    ("bare CR", b"GET /collect?a=1 HTTP/1.1\rHost: x\r\n\r\n", 400, True, 0),
    ("NUL in a header", POST + b"X-A: a\x00b\r\nContent-Length: 2\r\n\r\nok", 400, True, 0),
]


@pytest.mark.parametrize(
    ("name", "raw", "status", "closes", "stored"), CASES, ids=[c[0] for c in CASES]
)
async def test_conformance(
    app: App, tmp_path: Path, name: str, raw: bytes, status: int | None, closes: bool, stored: int
) -> None:
    r, w = await connect(app)
    w.write(raw)
    await w.drain()
    resp = await asyncio.wait_for(read_response(r), 5)
    assert resp.status == status, name
    if closes:
        assert await asyncio.wait_for(r.read(), 5) == b""
    else:
        assert resp.headers["connection"] == "keep-alive"
    w.close()
    await app.shutdown()
    assert len(lake_records(tmp_path / "data" / "lake")) == stored


async def test_trailers_never_change_the_request_headers(app: App, tmp_path: Path) -> None:
    r, w = await connect(app)
    w.write(
        POST
        + b"User-Agent: real/1\r\nX-Forwarded-For: 81.2.69.160\r\nTransfer-Encoding: chunked\r\n\r\n"
        + chunked(b"ok", b"X-Forwarded-For: 8.8.8.8\r\nUser-Agent: evil\r\nCookie: stolen=1\r\n")
    )
    await w.drain()
    assert (await read_response(r)).status == 200
    w.close()
    await app.shutdown()
    [rec] = lake_records(tmp_path / "data" / "lake")
    assert rec["ip"] == "81.2.69.160"
    assert rec["user_agent"] == "real/1"
    assert rec["cookie"] == ""


async def test_a_trailer_flood_is_cut_off_quickly(app: App, tmp_path: Path) -> None:
    r, w = await connect(app)
    w.write(POST + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX-Flood: ")
    t0 = time.monotonic()
    sent = 0
    with contextlib.suppress(ConnectionError):
        while sent < 32 << 20 and not r.at_eof() and time.monotonic() - t0 < 10:
            w.write(b"a" * 16384)  # up to 32 MiB, until the server closes
            await w.drain()
            sent += 16384
    with contextlib.suppress(ConnectionError):
        await asyncio.wait_for(r.read(), 5)
    assert time.monotonic() - t0 < 10
    app.metrics.flush()
    assert (
        app.metrics.registry.get_sample_value(
            "http_responses_total", {"route": "collect", "status": "431"}
        )
        == 1
    )
    w.close()
    await app.shutdown()
    assert lake_records(tmp_path / "data" / "lake") == []


async def test_a_chunk_split_after_its_size_line_is_not_a_trailer(app: App, tmp_path: Path) -> None:
    r, w = await connect(app)
    w.write(POST + b"Transfer-Encoding: chunked\r\n\r\n3e8\r\n")
    await w.drain()
    await asyncio.sleep(0.05)  # the chunk's data arrives in a later read
    w.write(b"z" * 1000 + b"\r\n0\r\n\r\n")
    await w.drain()
    assert (await read_response(r)).status == 200


def expect(method: bytes, path: bytes, version: bytes, extra: bytes = b"") -> bytes:
    return b"%s %s HTTP/%s\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n%s\r\n" % (
        method,
        path,
        version,
        extra,
    )


@pytest.mark.parametrize(
    ("name", "head", "final"),
    [
        ("405 is known from the head", expect(b"PUT", b"/collect", b"1.1"), 405),
        (
            "415 is known from the head",
            expect(b"POST", b"/api/v1/analytics/events", b"1.1", b"Content-Type: image/png\r\n"),
            415,
        ),
        (
            "413 is known from the head",
            b"POST /collect HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5000\r\n\r\n",
            413,
        ),
    ],
)
async def test_no_100_continue_before_an_answer_the_head_decides(
    app: App, name: str, head: bytes, final: int
) -> None:
    r, w = await connect(app)
    w.write(head)
    await w.drain()
    resp = await asyncio.wait_for(read_response(r), 5)
    assert resp.status == final, name


async def test_no_100_continue_to_http10(app: App) -> None:
    r, w = await connect(app)
    w.write(expect(b"POST", b"/collect", b"1.0"))
    await w.drain()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(r.readline(), 0.3)  # nothing: it waits for the body
    w.write(b"ok")
    await w.drain()
    assert (await read_response(r)).status == 200


async def test_100_continue_to_http11(app: App) -> None:
    r, w = await connect(app)
    w.write(expect(b"POST", b"/collect", b"1.1"))
    await w.drain()
    assert (await asyncio.wait_for(read_response(r), 5)).status == 100
    w.write(b"ok")
    await w.drain()
    assert (await read_response(r)).status == 200


async def test_nothing_after_a_close_answer_is_handled(app: App, tmp_path: Path) -> None:
    r, w = await connect(app)
    w.write(
        b"POST /collect HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
        + POST
        + b"Content-Length: 2\r\n\r\nno"
    )
    await w.drain()
    first = await read_response(r)
    assert first.status == 200
    assert first.headers["connection"] == "close"
    assert await asyncio.wait_for(r.read(), 5) == b""  # no second answer
    w.close()
    await app.shutdown()
    assert [rec["body"] for rec in lake_records(tmp_path / "data" / "lake")] == ["ok"]
