"""``message_queue_trace_log``: what happened to each message, for seed
004's ``mq-traces`` lookups.

``MQ_TRACE``: ``all`` (PUBLISH, CONSUME_SUCCESS and CONSUME_FAIL),
``failures`` (the default: CONSUME_FAIL only) or ``off``. Rows are buffered
and written in batches (``flush``), so tracing costs one INSERT per batch;
``purge`` deletes rows older than ``MQ_TRACE_RETENTION`` in bounded batches.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import delete, insert, select

from estat.store.db import Database
from estat.store.retention import created_before
from estat.store.schema import ERROR_MAX, message_queue_trace_log

T = message_queue_trace_log
BUFFER_MAX = 10_000  # rows held at most; beyond, the oldest are dropped (counted)


class TraceLog:
    def __init__(self, db: Database, mode: str, provider: str, topic: str, group: str) -> None:
        self.db = db
        self.mode = mode
        self.provider = provider
        self.topic = topic
        self.group = group
        self._rows: list[dict[str, Any]] = []
        self.dropped = 0

    def wants(self, stage: str) -> bool:
        if self.mode == "all":
            return True
        return self.mode == "failures" and stage == "CONSUME_FAIL"

    def add(
        self,
        stage: str,
        message_id: str,
        key: str | None,
        now: datetime,
        millis: int | None = None,
        error: str | None = None,
    ) -> None:
        if not self.wants(stage):
            return
        if len(self._rows) >= BUFFER_MAX:
            del self._rows[0]
            self.dropped += 1
        self._rows.append(
            {
                "message_id": message_id[:64],
                "topic": self.topic,
                "provider": self.provider,
                "message_key": (key or None) and key[:200],
                "consumer_group": self.group if stage != "PUBLISH" else None,
                "stage": stage,
                "processing_millis": millis,
                "error_message": error[:ERROR_MAX] if error else None,
                "created_at": now,
            }
        )

    @property
    def buffered(self) -> int:
        return len(self._rows)

    def flush(self) -> int:
        """Write the buffered rows (on the database thread). On failure the
        rows are kept for the next flush."""
        rows, self._rows = self._rows, []
        if not rows:
            return 0
        try:
            with self.db.engine.begin() as conn:
                conn.execute(insert(T), rows)
        except BaseException:
            self._rows[:0] = rows
            raise
        return len(rows)

    def purge(self, before: datetime, batch: int = 5000) -> int:
        """Delete one batch of rows older than ``before``; the number deleted."""
        with self.db.engine.begin() as conn:
            last = created_before(conn, T, before)  # the rest is newer: not read
            if last is None:
                return 0
            ids = (
                select(T.c.id)
                .where(T.c.created_at < before, T.c.id <= last)
                .order_by(T.c.id)
                .limit(batch)
            )
            return conn.execute(delete(T).where(T.c.id.in_(ids.scalar_subquery()))).rowcount


def traces(db: Database, message_id: str, limit: int) -> list[dict[str, Any]]:
    """The latest ``limit`` rows of one message, newest first."""
    stmt = select(T).where(T.c.message_id == message_id).order_by(T.c.id.desc()).limit(limit)
    with db.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(stmt)]
