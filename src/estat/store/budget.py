"""Whole-table counts an operator asks for (the admin summaries), within a
time budget.

Exact counts of finished rows (PUBLISHED, DISPATCHED) and of the event
table read every row: about 0.2 µs per row here, so tens of seconds once a
week of retention holds a few hundred million (``docs/benchmarks.md``). On
PostgreSQL such a read stops after ``SUMMARY_BUDGET`` (``Overrun``) and the
caller answers with what the indexes give exactly (the rows still to be
sent) and PostgreSQL's own estimate for the rest (``estimated_rows``: the
table's row count from its last ``ANALYZE`` or vacuum, split by the column's
most common values), flagged as estimated. SQLite counts exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from sqlalchemy import Connection, text
from sqlalchemy.exc import DBAPIError

from estat.store.db import Database

T = TypeVar("T")

#: seconds an exact whole-table count may take before an estimate answers
SUMMARY_BUDGET = 10.0


class Overrun(Exception):
    """The exact count did not finish within ``SUMMARY_BUDGET``."""


def within_budget(db: Database, read: Callable[[Connection], T]) -> T:
    """``read`` on a connection whose statements stop after
    ``SUMMARY_BUDGET`` on PostgreSQL: ``Overrun`` when one does."""
    with db.engine.begin() as conn:
        if db.dialect == "postgresql":
            conn.execute(text(f"SET LOCAL statement_timeout = {int(SUMMARY_BUDGET * 1000)}"))
        try:
            return read(conn)
        except DBAPIError as e:
            if getattr(e.orig, "sqlstate", None) == "57014":  # query_canceled
                raise Overrun from None
            raise


def exact_or_estimated(
    db: Database, exact: Callable[[Connection], T], estimated: Callable[[Connection], T]
) -> tuple[T, bool]:
    """(``exact``'s answer, False) when it fits ``SUMMARY_BUDGET``, else
    (``estimated``'s, True)."""
    try:
        return within_budget(db, exact), False
    except Overrun:
        with db.engine.connect() as conn:
            return estimated(conn), True


def estimated_rows(conn: Connection, table: str, column: str | None = None) -> dict[str, int]:
    """PostgreSQL's estimate of ``table``'s rows (``""`` → all), and, given
    ``column``, of the rows holding each of its most common values."""
    total = conn.execute(
        text("SELECT greatest(reltuples, 0)::bigint FROM pg_class WHERE oid = to_regclass(:t)"),
        {"t": table},
    ).scalar()
    out = {"": int(total or 0)}
    if column is not None:
        row = conn.execute(
            text(
                "SELECT most_common_vals::text::text[], most_common_freqs FROM pg_stats "
                "WHERE schemaname = current_schema() AND tablename = :t AND attname = :c"
            ),
            {"t": table, "c": column},
        ).first()
        if row is not None and row[0] is not None:
            for value, freq in zip(row[0], row[1], strict=True):
                out[str(value)] = round(out[""] * float(freq))
    return out
