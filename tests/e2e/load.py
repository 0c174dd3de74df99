"""A small keep-alive HTTP/1.1 load client for end-to-end tests."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field


@dataclass
class LoadResult:
    acked: set[str] = field(default_factory=set)
    statuses: dict[int, int] = field(default_factory=dict)


async def post_collect(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    ident: str,
    result: LoadResult,
    pad: bytes = b"x" * 200,
) -> int:
    """One keep-alive ``POST /collect`` whose body carries ``ident``; counted in ``result``."""
    body = b'{"id":"%s","pad":"%s"}' % (ident.encode(), pad)
    writer.write(
        b"POST /collect HTTP/1.1\r\nHost: t\r\nUser-Agent: load/1\r\n"
        b"X-Forwarded-For: 81.2.69.160\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    await writer.drain()
    status = int((await reader.readline()).split()[1])
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    if length:
        await reader.readexactly(length)
    result.statuses[status] = result.statuses.get(status, 0) + 1
    if status == 200:
        result.acked.add(ident)
    return status


async def _conn(
    host: str, port: int, cid: str, n: int, result: LoadResult, interval: float = 0.0
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    loop = asyncio.get_running_loop()
    start = loop.time()
    try:
        for i in range(n):
            if interval:  # paced: request i leaves at start + i * interval
                await asyncio.sleep(max(0.0, start + i * interval - loop.time()))
            await post_collect(reader, writer, f"{cid}-{i}", result)
    finally:
        writer.close()
        await writer.wait_closed()


async def run_load(
    host: str, port: int, *, connections: int, per_connection: int, rate: float = 0.0
) -> LoadResult:
    """``connections`` keep-alive connections, ``per_connection`` requests each;
    ``rate`` (requests per second over all connections) paces them, 0 = flat out."""
    result = LoadResult()
    tag = uuid.uuid4().hex[:8]  # ids unique across runs
    interval = connections / rate if rate else 0.0
    await asyncio.gather(
        *(
            _conn(host, port, f"{tag}c{c}", per_connection, result, interval)
            for c in range(connections)
        )
    )
    return result
