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
