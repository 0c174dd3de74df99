"""The idempotent event store: ``user_activity_event`` rows, one per
``event_id``, and in the same transaction one dispatch-outbox row per
configured destination for each *newly* inserted event."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection

from estat.store.db import Database
from estat.store.schema import user_activity_dispatch_outbox, user_activity_event


@dataclass(frozen=True, slots=True)
class Stored:
    inserted: list[str]  # event ids inserted by this call
    duplicates: int
    dispatch: dict[str, int]  # dispatch-outbox rows inserted, by target


class EventStore:
    def __init__(self, db: Database, targets: Sequence[str] = ()) -> None:
        self.db = db
        self.targets = tuple(targets)
        t = user_activity_event
        self._insert = (
            db.insert(t).on_conflict_do_nothing(index_elements=["event_id"]).returning(t.c.event_id)
        )
        d = user_activity_dispatch_outbox
        self._dispatch = (
            db.insert(d)
            .on_conflict_do_nothing(index_elements=["event_id", "dispatch_target"])
            .returning(d.c.dispatch_target)
        )

    def store(self, rows: Sequence[dict[str, Any]], payloads: Sequence[str]) -> Stored:
        """Insert ``rows`` (``estat.store.rows.event_row``) in one transaction;
        ``payloads[i]`` is row i's event JSON, the dispatch-outbox payload."""
        with self.db.engine.begin() as conn:
            return self.store_in(conn, rows, payloads)

    def store_in(
        self, conn: Connection, rows: Sequence[dict[str, Any]], payloads: Sequence[str]
    ) -> Stored:
        # the first of identical ids in a batch wins, as across batches
        seen: dict[str, int] = {}
        for i, row in enumerate(rows):
            seen.setdefault(row["event_id"], i)
        unique = [rows[i] for i in seen.values()]
        inserted = [r[0] for r in conn.execute(self._insert, unique)] if unique else []
        per_target: dict[str, int] = {}
        if self.targets and inserted:
            dispatch = [
                {
                    "event_id": eid,
                    "dispatch_target": target,
                    "payload": payloads[seen[eid]],
                    "status": "PENDING",
                }
                for eid in inserted
                for target in self.targets
            ]
            for (target,) in conn.execute(self._dispatch, dispatch):
                per_target[target] = per_target.get(target, 0) + 1
        return Stored(inserted, len(rows) - len(inserted), per_target)
