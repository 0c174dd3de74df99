"""What the activity stages share: records as bus messages, database
errors sorted into *transient* (retry the same work later) and *data* (this
input can never be written), and the rescue of held events."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

import msgspec
from sqlalchemy.exc import (
    DataError,
    IntegrityError,
    StatementError,
)

from estat.bus.base import key_of, message_of
from estat.dlq.store import fsync_dir, write_synced
from estat.model import EventRecord
from estat.store.db import TRANSIENT_DB as TRANSIENT_DB
from estat.store.rows import encode


def is_data_error(e: BaseException) -> bool:
    """The statement can never succeed with this input (a ``\\u0000`` that
    jsonb rejects, a value out of range): split the batch, park the culprit.
    Not a ``ProgrammingError`` (a table missing, a privilege revoked): the
    statement fails for every input, none is at fault; retried like a
    database that is down until someone fixes it."""
    if isinstance(e, DataError | IntegrityError):
        return True
    return (
        isinstance(e, StatementError)
        and not getattr(e, "connection_invalidated", False)
        and (e.orig is None or isinstance(e.orig, ValueError | TypeError | UnicodeError))
    )


class Spool:
    """A crash-safe local spool of events (JSON Lines files committed by
    rename, the DLQ's writer): where accepted events go at shutdown when
    neither the bus nor the database takes them; published at the next start."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def write(self, records: Sequence[EventRecord]) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        data = b"".join(encode(r) + b"\n" for r in records)
        stem = f"{time.time_ns()}-{len(records)}-{os.getpid()}"
        tmp = self.root / f".{stem}.tmp"
        write_synced(tmp, data)
        final = self.root / f"{stem}.jsonl"
        os.rename(tmp, final)
        fsync_dir(self.root)
        return final

    def files(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(self.root.glob("*.jsonl"))

    def count(self) -> int:
        return sum(int(p.name.split("-")[1]) for p in self.files())

    @staticmethod
    def read(path: Path) -> list[EventRecord]:
        dec = msgspec.json.Decoder(EventRecord)
        return [dec.decode(line) for line in path.read_bytes().splitlines() if line.strip()]


__all__ = ["TRANSIENT_DB", "Spool", "is_data_error", "key_of", "message_of"]
