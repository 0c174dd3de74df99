"""``estat_worker_state``: the pause state of the workers, read by every
process, written by the admin API."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select, update

from estat.store.db import Database
from estat.store.schema import estat_worker_state as T


def read_states(db: Database) -> dict[str, dict[str, Any]]:
    with db.engine.connect() as conn:
        return {r.name: dict(r._mapping) for r in conn.execute(select(T))}


def set_state(db: Database, name: str, paused: bool, by: str | None, now: datetime) -> None:
    values = {"paused": paused, "updated_at": now, "updated_by": by}
    with db.engine.begin() as conn:
        if conn.execute(update(T).where(T.c.name == name).values(**values)).rowcount == 0:
            conn.execute(T.insert().values(name=name, **values))
