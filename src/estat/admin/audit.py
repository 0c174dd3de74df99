"""``admin_audit_log``: one row per admin call, refused ones included:
time, token name, client address, method, route, parameters, status and
effect. Never the token."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import insert, select

from estat.store.db import Database
from estat.store.schema import admin_audit_log as T


class AuditLog:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def write(
        self,
        *,
        token_name: str | None,
        client: str,
        method: str,
        route: str,
        parameters: dict[str, Any],
        status: int,
        effect: dict[str, Any] | None,
    ) -> None:
        row = {
            "token_name": token_name,
            "client": client[:100],
            "method": method[:10],
            "route": route[:200],
            "parameters": parameters,
            "status": status,
            "effect": effect,
        }

        def _write() -> None:
            with self.db.engine.begin() as conn:
                conn.execute(insert(T).values(**row))

        await self.db.run(_write, on="admin")

    async def recent(self, limit: int, since: datetime | None) -> list[dict[str, Any]]:
        stmt = select(T).order_by(T.c.id.desc()).limit(limit)
        if since is not None:
            stmt = stmt.where(T.c.created_at >= since)

        def _read() -> list[dict[str, Any]]:
            with self.db.engine.connect() as conn:
                return [dict(r._mapping) for r in conn.execute(stmt)]

        return await self.db.run(_read, on="admin")
