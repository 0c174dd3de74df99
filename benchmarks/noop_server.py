"""The ceiling: a bare uvloop + httptools HTTP/1.1 server that answers 200.

It parses requests with the same parser as estat and does nothing else, so
``estat / noop`` is the share of the HTTP stack's capacity that estat's
work (enrichment, JSON, queueing, batching, gzip, lake writes, metrics)
leaves to the clients.
"""

from __future__ import annotations

import asyncio
import sys

import httptools
import uvloop

RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: keep-alive\r\n\r\n"


class Noop(asyncio.Protocol):
    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.close()

    def on_message_complete(self) -> None:
        if self.transport is not None:
            self.transport.write(RESPONSE)


async def main(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Noop, "127.0.0.1", port, backlog=2048)
    print(f"noop listening on {port}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1])))
