"""The idempotent event store: ``user_activity_event`` rows, one per
``event_id``, and in the same transaction one dispatch-outbox row per
configured destination for each *newly* inserted event."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError

from estat.store.db import Database
from estat.store.schema import user_activity_dispatch_outbox, user_activity_event


@dataclass(frozen=True, slots=True)
class Stored:
    inserted: int  # events inserted by this call
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
        #: one dispatch row per parameter set, none where one exists; returns the targets added
        self.dispatch_insert = (
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
        if self.db.dialect == "postgresql" and unique:
            return self._copy_in(conn, unique, [payloads[i] for i in seen.values()], len(rows))
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
            for (target,) in conn.execute(self.dispatch_insert, dispatch):
                per_target[target] = per_target.get(target, 0) + 1
        return Stored(len(inserted), len(rows) - len(inserted), per_target)

    def _copy_in(
        self, conn: Connection, rows: list[dict[str, Any]], payloads: list[str], total: int
    ) -> Stored:
        """PostgreSQL: ``COPY`` the batch into a session-local staging table,
        then one ``INSERT … SELECT … ON CONFLICT (event_id) DO NOTHING`` that
        also writes the new events' dispatch rows. A multi-row ``VALUES``
        costs about 8 times as much here: psycopg re-parses every long
        statement's placeholders (docs/benchmarks.md)."""
        raw = conn.connection.dbapi_connection
        assert raw is not None
        try:
            with raw.cursor() as cur:  # type: ignore[attr-defined]
                cur.execute(_STAGING)
                with cur.copy(_COPY) as cp:
                    for row, payload in zip(rows, payloads, strict=True):
                        cp.write_row([row[c] for c in _COLUMNS] + [payload])
                cur.execute(_MOVE, {"targets": list(self.targets)})
                counted = cur.fetchall()
        except psycopg.Error as e:
            raise DBAPIError.instance("COPY user_activity_event", None, e, psycopg.Error) from e
        inserted = 0
        per_target: dict[str, int] = {}
        for target, n in counted:
            if target is None:
                inserted = int(n)
            else:
                per_target[target] = int(n)
        return Stored(inserted, total - inserted, per_target)


_COLUMNS = (
    "event_id",
    "event_name",
    "event_version",
    "occurred_at",
    "member_id",
    "anonymous_id",
    "session_id",
    "source",
    "request_path",
    "request_method",
    "device_id",
    "platform",
    "app_version",
    "locale",
    "properties",
    "member_key",
)
_STAGING = (
    "CREATE TEMP TABLE IF NOT EXISTS estat_event_staging "
    "(LIKE user_activity_event INCLUDING DEFAULTS, payload text) ON COMMIT DELETE ROWS"
)
_COPY = (
    "COPY estat_event_staging (event_id, event_name, event_version, occurred_at, member_id, "
    "anonymous_id, session_id, source, request_path, request_method, device_id, platform, "
    "app_version, locale, properties, member_key, payload) FROM STDIN"
)
_MOVE = (
    "WITH ins AS (INSERT INTO user_activity_event (event_id, event_name, event_version, "
    "occurred_at, member_id, anonymous_id, session_id, source, request_path, request_method, "
    "device_id, platform, app_version, locale, properties, member_key) "
    "SELECT event_id, event_name, event_version, occurred_at, member_id, anonymous_id, "
    "session_id, source, request_path, request_method, device_id, platform, app_version, "
    "locale, properties, member_key FROM estat_event_staging "
    "ON CONFLICT (event_id) DO NOTHING RETURNING event_id), "
    "dis AS (INSERT INTO user_activity_dispatch_outbox (event_id, dispatch_target, payload, status) "
    "SELECT s.event_id, t.target, s.payload::jsonb, 'PENDING' "
    "FROM ins JOIN estat_event_staging s USING (event_id) "
    "CROSS JOIN unnest(%(targets)s::text[]) AS t(target) "
    "ON CONFLICT (event_id, dispatch_target) DO NOTHING RETURNING dispatch_target) "
    "SELECT NULL, count(*) FROM ins "
    "UNION ALL SELECT dispatch_target, count(*) FROM dis GROUP BY dispatch_target"
)
