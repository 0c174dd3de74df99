"""``estat store verify-backup FILE``: is this backup of the event store
usable? (seed 003's backup verification, made a command.)

The ``pg_dump`` file (custom format, ``pg_dump -Fc``, or plain SQL) is
restored into a scratch database created on the same PostgreSQL server as
``DATABASE_URL`` (or ``--scratch-url``), then compared with the live store:
its schema revision, the rows of every table, the newest event. Verdict:

- OK: it restored, has estat's tables and a schema revision, holds no
  event the live store lacks (events are never deleted), and its newest
  event is at most ``--max-age`` older than the live newest;
- WARN (exit 1): it restored but is older than ``--max-age``;
- FAIL (exit 2): it did not restore, tables are missing, or it holds rows
  the live store does not (it is not a backup of this store).

The scratch database is dropped afterwards (``--keep`` keeps it).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from estat.settings import Settings

# SQLAlchemy and the store are imported where used: ``estat serve`` builds
# the command-line parser (this module's part too) before it holds SIGTERM.


def tables() -> list[str]:
    from estat.store.schema import metadata

    return sorted(t.name for t in metadata.sorted_tables)


@dataclass(frozen=True, slots=True)
class Snapshot:
    revision: str | None
    rows: dict[str, int | None]  # None: the table is missing
    newest: datetime | None  # the newest occurred_at of user_activity_event


def add_backup_parser(store_sub: Any) -> None:
    v = store_sub.add_parser(
        "verify-backup",
        help="restore a pg_dump file into a scratch database and compare it with the live store",
        description=(__doc__ or "").split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    v.add_argument("file", type=Path, help="a pg_dump file (custom format or plain SQL)")
    v.add_argument(
        "--max-age", default="26h", help="how much older than the live store it may be (26h)"
    )
    v.add_argument(
        "--scratch-url", default=None, help="a server to restore on (default: DATABASE_URL's)"
    )
    v.add_argument("--keep", action="store_true", help="keep the scratch database")


def snapshot(engine: Engine) -> Snapshot:
    from sqlalchemy import func, select, text

    from estat.store.schema import metadata, user_activity_event

    rows: dict[str, int | None] = {}
    with engine.connect() as conn:
        present = set(
            conn.execute(
                text("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")
            ).scalars()
        )
        revision = (
            conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
            if "alembic_version" in present
            else None
        )
        for name in tables():
            rows[name] = (
                int(
                    conn.execute(
                        select(func.count()).select_from(metadata.tables[name])
                    ).scalar_one()
                )
                if name in present
                else None
            )
        newest = (
            conn.execute(select(func.max(user_activity_event.c.occurred_at))).scalar()
            if "user_activity_event" in present
            else None
        )
    return Snapshot(revision, rows, newest)


def _restore(file: Path, url: str) -> str | None:
    """Restore ``file`` into ``url``; the error, or None."""
    from sqlalchemy.engine import make_url

    libpq = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    with file.open("rb") as f:
        custom = f.read(5) == b"PGDMP"
    tool = "pg_restore" if custom else "psql"
    exe = shutil.which(tool)
    if exe is None:
        return f"{tool} not found (install PostgreSQL's client tools)"
    args = (
        [exe, "--no-owner", "--no-privileges", "--exit-on-error", "-d", libpq, str(file)]
        if custom
        else [exe, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", libpq, "-f", str(file)]
    )
    run = subprocess.run(args, capture_output=True, text=True, timeout=3600)
    if run.returncode != 0:
        return (
            (run.stderr or run.stdout).strip().splitlines()[-1][:300]
            if (run.stderr or run.stdout)
            else f"{tool} exited {run.returncode}"
        )
    return None


def run_verify_backup(settings: Settings, args: argparse.Namespace) -> int:
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    from estat.settings import parse_duration
    from estat.store.db import Database

    live_url = Database(settings.database).url
    if make_url(live_url).get_backend_name() != "postgresql":
        print(
            "estat: verify-backup needs a PostgreSQL DATABASE_URL (pg_dump files)", file=sys.stderr
        )
        return 2
    if not args.file.is_file():
        print(f"estat: {args.file}: no such file", file=sys.stderr)
        return 2
    max_age = timedelta(seconds=parse_duration(args.max_age))
    server = make_url(args.scratch_url or live_url)
    scratch_name = f"estat_verify_{uuid.uuid4().hex[:10]}"
    admin = create_engine(server.set(database="postgres"), isolation_level="AUTOCOMMIT")
    scratch_url = server.set(database=scratch_name).render_as_string(hide_password=False)
    live = create_engine(live_url)
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{scratch_name}"'))
        error = _restore(args.file, scratch_url)
        scratch = create_engine(scratch_url)
        try:
            got = snapshot(scratch) if error is None else None
        finally:
            scratch.dispose()
        want = snapshot(live)
    finally:
        live.dispose()
        if not args.keep:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{scratch_name}" WITH (FORCE)'))
        admin.dispose()
    return _verdict(args.file, got, want, error, max_age, scratch_name if args.keep else None)


def _verdict(
    file: Path,
    got: Snapshot | None,
    want: Snapshot,
    error: str | None,
    max_age: timedelta,
    kept: str | None,
) -> int:
    print(f"backup {file}")
    if got is None:
        print(f"FAIL: it did not restore: {error}")
        return 2
    names = tables()
    width = max(len(t) for t in names)
    print(f"{'table'.ljust(width)}  {'backup':>10}  {'live':>10}")
    problems: list[str] = []
    for name in names:
        b, lv = got.rows[name], want.rows[name]
        print(
            f"{name.ljust(width)}  {'missing' if b is None else b:>10}  {'-' if lv is None else lv:>10}"
        )
        if b is None:
            problems.append(f"{name} is missing")
        elif (
            lv is not None and b > lv and name not in ("message_queue_trace_log", "admin_audit_log")
        ):
            problems.append(f"{name} holds {b - lv} rows more than the live store")
    print(f"schema revision: backup {got.revision}, live {want.revision}")
    print(f"newest event: backup {got.newest}, live {want.newest}")
    if kept:
        print(f"scratch database kept: {kept}")
    if got.revision is None:
        problems.append("no alembic_version: not an estat database")
    if problems:
        print("FAIL: " + "; ".join(problems))
        return 2
    if want.newest is not None and (got.newest is None or want.newest - got.newest > max_age):
        behind = "no events" if got.newest is None else str(want.newest - got.newest)
        print(f"WARN: the backup is older than {max_age} ({behind} behind the live store)")
        return 1
    print("OK: the backup restores and matches the live store")
    return 0
