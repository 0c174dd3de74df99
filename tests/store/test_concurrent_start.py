"""The workers of one server open and migrate one SQLite file at the same
moment: none of them may fail with "database is locked"."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

from sqlalchemy import inspect

from estat.store.db import Database


def _migrate(url: str) -> None:
    d = Database(url)
    d.upgrade()
    d.close()


def test_eight_processes_migrating_one_sqlite_file_at_once_all_succeed(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    for round_ in range(5):
        url = f"sqlite:///{tmp_path / f'e{round_}.db'}"
        procs = [ctx.Process(target=_migrate, args=(url,)) for _ in range(8)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        assert [p.exitcode for p in procs] == [0] * 8
        d = Database(url)
        assert "user_activity_event" in inspect(d.engine).get_table_names()
        assert d.current() == d.head()
        d.close()


def test_a_start_on_a_database_at_head_does_not_load_the_migration_tooling(
    tmp_path: Path,
) -> None:
    """Every start but the first finds the schema at head with one query:
    alembic (and its template engine, ~0.5 s to import) is not loaded."""
    import subprocess
    import sys

    url = f"sqlite:///{tmp_path / 'e.db'}"
    probe = (
        "import sys; from estat.store.db import HEAD, Database; d = Database(sys.argv[1]);"
        " d.upgrade(); print(HEAD, 'alembic' in sys.modules)"
    )
    runs = [
        subprocess.run(
            [sys.executable, "-c", probe, url], capture_output=True, text=True, check=True
        ).stdout.split()
        for _ in range(2)
    ]
    assert runs[0][1] == "True"  # a new database: migrated
    assert runs[1][1] == "False"  # at head: nothing loaded
    d = Database(url)
    assert d.head() == d.current() == runs[1][0]  # the newest file is alembic's head
    d.close()
