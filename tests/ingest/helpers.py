"""In-process estat for HTTP tests, and a raw HTTP/1.1 client."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from estat.app import App
from estat.codec import decode
from estat.ops.metrics import Metrics
from estat.settings import load_settings


async def start_app(tmp_path: Path, sink: Any = None, **overrides: Any) -> App:
    overrides.setdefault("admin_addr", "off")  # tests that want it give a free port
    settings = load_settings(
        http_addr="127.0.0.1:0", data_dir=tmp_path / "data", instance_id="t1", **overrides
    )
    app = App(settings, metrics=Metrics(CollectorRegistry()), sink=sink)
    await app.start()
    return app


def lake_records(root: Path) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for f in sorted(root.rglob("*.jsonl.gz")):
        out.extend(decode(f.read_bytes()))
    return out


class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body


async def read_response(reader: asyncio.StreamReader) -> Response:
    line = await reader.readline()
    if not line:
        raise ConnectionError("closed")
    status = int(line.split()[1])
    headers: dict[str, str] = {}
    while True:
        h = await reader.readline()
        if h in (b"\r\n", b""):
            break
        k, _, v = h.decode().partition(":")
        headers[k.strip().lower()] = v.strip()
    n = int(headers.get("content-length", "0"))
    body = await reader.readexactly(n) if n else b""
    return Response(status, headers, body)


_open: list[asyncio.StreamWriter] = []


async def connect(app: App) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    assert app.address is not None
    r, w = await asyncio.open_connection(app.address[0], app.address[1])
    _open.append(w)
    return r, w


async def close_all() -> None:
    while _open:
        w = _open.pop()
        w.close()
        with contextlib.suppress(Exception):
            await w.wait_closed()


def post(path: str, body: bytes, extra: bytes = b"") -> bytes:
    return (
        b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n%s\r\n"
        % (path.encode(), len(body), extra)
        + body
    )
