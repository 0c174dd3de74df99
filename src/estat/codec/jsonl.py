"""gzip JSON Lines: one JSON object per line, the whole object gzip-compressed.

Compression uses ISA-L (``isal``), 4-6 times faster than the standard
library's zlib at level 1 on event data, and releases the GIL, so encoding
runs in a worker thread without stalling the event loop. The output has no
timestamp in its gzip header: the same lines always encode to the same
bytes, so a retried upload writes an identical object.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson
from isal import isal_zlib

GZIP_WBITS = 31  # gzip container
LEVEL = 1


class CodecError(ValueError):
    """The data is not valid gzip JSON Lines; ``reason`` is low-cardinality."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def encode(lines: bytes | bytearray) -> bytes:
    """Compress already-serialised JSON Lines (every line ending in ``\\n``)."""
    data: bytes = isal_zlib.compress(lines, LEVEL, GZIP_WBITS)
    return data


def decompress(data: bytes) -> bytes:
    try:
        d = isal_zlib.decompressobj(GZIP_WBITS)
        out: bytes = d.decompress(data)
        if not d.eof:
            raise CodecError("truncated", "gzip stream ends early")
        if d.unused_data:
            raise CodecError("trailing_data", "bytes after the gzip stream")
    except isal_zlib.error as e:  # type: ignore[misc]
        raise CodecError("corrupt_gzip", str(e)) from None
    return out


def iter_records(data: bytes) -> Iterator[dict[str, Any]]:
    """Yield every record of a gzip JSON Lines object, validating each line."""
    raw = decompress(data)
    if raw and not raw.endswith(b"\n"):
        raise CodecError("truncated", "last line has no newline")
    for n, line in enumerate(raw.splitlines(), 1):
        try:
            rec = orjson.loads(line)
        except orjson.JSONDecodeError as e:
            raise CodecError("bad_json", f"line {n}: {e}") from None
        if not isinstance(rec, dict):
            raise CodecError("bad_json", f"line {n}: not an object")
        yield rec


def decode(data: bytes) -> list[dict[str, Any]]:
    return list(iter_records(data))
