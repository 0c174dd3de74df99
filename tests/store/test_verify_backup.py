"""``estat store verify-backup`` with real ``pg_dump`` files of a real
PostgreSQL store: a fresh backup (custom format and plain SQL) is OK, one
older than ``--max-age`` is a WARN, a truncated file and another
database's dump FAIL; the scratch database is always dropped."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from estat.store.db import Database
from estat.store.events import EventStore
from estat.store.rows import encode, event_row
from tests.servers import libpq, pg_bin
from tests.store.test_store import rec


def dump(url: str, path: Path, fmt: str) -> Path:
    subprocess.run([pg_bin("pg_dump"), f"-F{fmt}", "-f", str(path), libpq(url)], check=True)
    return path


def verify(url: str, tmp_path: Path, *args: str) -> tuple[int, str]:
    run = subprocess.run(
        [sys.executable, "-m", "estat", "store", "verify-backup", *args],
        env={**os.environ, "DATABASE_URL": url, "DATA_DIR": str(tmp_path / "data"),
             "PATH": f"{Path(pg_bin('pg_dump')).parent}:{os.environ['PATH']}"},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    return run.returncode, run.stdout + run.stderr


def scratch_databases(url: str) -> list[str]:
    with psycopg.connect(libpq(url)) as conn:
        rows = conn.execute("SELECT datname FROM pg_database WHERE datname LIKE 'estat_verify_%'")
        return [r[0] for r in rows]


def store(db: Database, n: int) -> None:
    records = [rec() for _ in range(n)]
    EventStore(db, ["POSTHOG"]).store(
        [event_row(r) for r in records], [encode(r).decode() for r in records]
    )


@pytest.mark.parametrize("fmt", ["c", "p"])
def test_a_fresh_backup_is_ok_and_the_scratch_database_goes(
    pg_url: str, tmp_path: Path, fmt: str
) -> None:
    db = Database(pg_url)
    db.upgrade()
    store(db, 30)
    backup = dump(pg_url, tmp_path / f"estat.{fmt}dump", fmt)
    store(db, 5)  # the live store moved on since
    rc, out = verify(pg_url, tmp_path, str(backup))
    assert rc == 0, out
    assert "OK: the backup restores" in out
    line = next(x for x in out.splitlines() if x.startswith("user_activity_event "))
    assert line.split()[1:] == ["30", "35"]
    assert scratch_databases(pg_url) == []
    db.close()


def test_an_old_broken_or_foreign_backup_is_refused(pg_url: str, tmp_path: Path) -> None:
    db = Database(pg_url)
    db.upgrade()
    store(db, 3)
    good = dump(pg_url, tmp_path / "estat.dump", "c")
    broken = tmp_path / "broken.dump"
    broken.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 3])
    rc, out = verify(pg_url, tmp_path, str(broken))
    assert rc == 2, out
    assert "FAIL: it did not restore" in out
    # a dump of another database (no estat tables)
    other = tmp_path / "other.sql"
    other.write_text("CREATE TABLE orders (id int);\nINSERT INTO orders VALUES (1);\n")
    rc, out = verify(pg_url, tmp_path, str(other))
    assert rc == 2, out
    assert "user_activity_event is missing" in out
    # the live store holds fewer events than the backup: not this store's backup
    with psycopg.connect(libpq(pg_url)) as conn:
        conn.execute("DELETE FROM user_activity_dispatch_outbox")
        conn.execute("DELETE FROM user_activity_event")
    rc, out = verify(pg_url, tmp_path, str(good))
    assert rc == 2, out
    assert "holds 3 rows more than the live store" in out
    assert scratch_databases(pg_url) == []
    db.close()


def test_a_backup_older_than_the_max_age_is_a_warning(pg_url: str, tmp_path: Path) -> None:
    db = Database(pg_url)
    db.upgrade()
    store(db, 2)
    backup = dump(pg_url, tmp_path / "estat.dump", "c")
    with psycopg.connect(libpq(pg_url)) as conn:  # the live store's newest event is 2 days on
        conn.execute("UPDATE user_activity_event SET occurred_at = occurred_at + interval '2 days'")
    rc, out = verify(pg_url, tmp_path, str(backup), "--max-age", "26h")
    assert rc == 1, out
    assert "WARN: the backup is older than 1 day, 2:00:00" in out
    db.close()
