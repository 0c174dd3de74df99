"""One database: the engine for ``DATABASE_URL``, the migrations, and the
dialect's ``INSERT … ON CONFLICT DO NOTHING``.

SQLite (the embedded default) runs in WAL mode with a busy timeout, so the
worker processes of one server share the file; PostgreSQL runs through
psycopg 3. Both are used synchronously, off the event loop
(``Database.run``): the statements are few and batched. On PostgreSQL the
relay, the store consumer, the housekeeper and the admin API each have a
thread of their own (``run(fn, on=...)``), and long reads another (``run_aside``), so none
waits for another's statements; SQLite (one writer) has one thread for all.
"""

from __future__ import annotations

import asyncio
import io
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import orjson
from sqlalchemy import Connection, Engine, Table, create_engine, event, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError, SQLAlchemyError

from estat.ops.logging import get_logger

if TYPE_CHECKING:
    from alembic.config import Config

T = TypeVar("T")

log = get_logger("estat.store")

#: the advisory lock (PostgreSQL) that serialises migrations
MIGRATION_LOCK = 0x657374617401  # "estat" 1

#: PostgreSQL: how long one migration attempt waits for a table's lock
#: before it gives way (then retries): a migration queued behind a long
#: query would otherwise hold every other session's statements on that table
MIGRATION_LOCK_TIMEOUT = 5.0
#: and how long it keeps trying before start-up fails, naming the blockers
MIGRATION_LOCK_PATIENCE = 600.0

#: a transient database failure: retried with backoff, nothing is given up
TRANSIENT_DB = (SQLAlchemyError, OSError)

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def _newest_revision() -> str:
    """The newest migration's revision, from the file names: revisions are
    numbered in order (``0005_ledger.py`` is ``0005``)."""
    return max(p.name.split("_", 1)[0] for p in (MIGRATIONS / "versions").glob("[0-9]*_*.py"))


HEAD = _newest_revision()

SQLITE_BUSY_TIMEOUT_MS = 30_000


class SchemaTooNew(Exception):
    """The database was migrated by a newer estat: refusing to run on it."""


class MigrationBlocked(Exception):
    """Other sessions held the locks a migration needs for too long."""


def normalise_url(url: str) -> str:
    """``postgresql://`` (and ``postgres://``) mean psycopg 3."""
    for plain in ("postgresql://", "postgres://"):
        if url.startswith(plain):
            return "postgresql+psycopg://" + url[len(plain) :]
    return url


def _json(value: Any) -> str:
    """Properties and payloads arrive already encoded (a ``str``): passed
    through; anything else is encoded with orjson."""
    if isinstance(value, str):
        return value
    return orjson.dumps(value).decode()


def describe(url: str) -> str:
    """The URL without its password, for logs and ``/ready``."""
    return make_url(normalise_url(url)).render_as_string(hide_password=True)


#: DATABASE_DEAD_PEER_TIMEOUT's default, seconds
DEAD_PEER_AFTER = 30.0


def pg_connect_args(url: str, dead_peer_after: float) -> dict[str, Any]:
    """libpq's connection parameters: a host that stops answering (frozen,
    unplugged, the old primary after a failover sends no reset) fails a
    statement in flight or a pooled connection's ping within about
    ``dead_peer_after`` seconds (keepalive probes from a third of it of
    silence, every sixth, 3 unanswered; data unacknowledged that long given
    up), instead of the operating system's two hours and more; the stage
    then retries on a new connection. Parameters the URL sets win."""
    t = max(2.0, dead_peer_after)
    args: dict[str, Any] = {
        "connect_timeout": 5,
        "keepalives": 1,
        "keepalives_idle": max(1, int(t / 3)),
        "keepalives_interval": max(1, int(t / 6)),
        "keepalives_count": 3,
        "tcp_user_timeout": int(t * 1000),
    }
    given = make_url(url).query
    return {k: v for k, v in args.items() if k not in given}


class Database:
    def __init__(
        self, url: str, *, pool_size: int = 4, dead_peer_after: float = DEAD_PEER_AFTER
    ) -> None:
        self.url = normalise_url(url)
        self.dead_peer_after = dead_peer_after
        u = make_url(self.url)
        self.dialect = u.get_backend_name()
        if self.dialect == "sqlite":
            if u.database and u.database != ":memory:":
                Path(u.database).parent.mkdir(parents=True, exist_ok=True)
            # the driver's own busy timeout from the first statement: the
            # workers of one server open (and migrate) the file at once
            # pooled: connections (and their descriptors) stay open instead
            # of being made for every transaction
            self.engine: Engine = create_engine(
                self.url,
                pool_size=2,
                max_overflow=2,
                json_serializer=_json,
                connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
            )
            event.listen(self.engine, "connect", _sqlite_pragmas)
            event.listen(self.engine, "begin", _sqlite_begin)
        elif self.dialect == "postgresql":
            self.engine = self._pg_engine(pool_size, pool_size)
        else:
            raise ValueError(f"unsupported database {self.dialect!r}: use sqlite or postgresql")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="estat-db")
        #: threads of their own, by name: a stage's (PostgreSQL), long reads
        self._threads: dict[str, ThreadPoolExecutor] = {}
        self._reserved: list[Engine] = []

    def _pg_engine(self, pool_size: int, max_overflow: int) -> Engine:
        return create_engine(
            self.url,
            pool_size=pool_size,
            max_overflow=max_overflow,
            pool_pre_ping=True,
            pool_recycle=1800,
            json_serializer=_json,
            connect_args=pg_connect_args(self.url, self.dead_peer_after),
        )

    def reserve(self, workers: int) -> Engine:
        """PostgreSQL: a pool of ``workers`` connections of their own, for
        workers that each keep one for a while (dispatch lanes, their lease's
        transaction open while the destination answers). On the shared pool
        (4 + 4 overflow) more such workers than it holds would wait for one
        another's connection, and the process's other work (the store
        consumer, the relay) behind them."""
        assert self.dialect == "postgresql"
        engine = self._pg_engine(workers, 0)
        self._reserved.append(engine)
        return engine

    @property
    def description(self) -> str:
        return self.engine.url.render_as_string(hide_password=True)

    @property
    def skip_locked(self) -> bool:
        return self.dialect == "postgresql"

    def insert(self, table: Table) -> Any:
        """The dialect's INSERT, which has ``on_conflict_do_nothing``."""
        return (postgresql.insert if self.dialect == "postgresql" else sqlite.insert)(table)

    async def run(self, fn: Callable[[], T], *, on: str | None = None) -> T:
        """``fn`` on this database's thread; on PostgreSQL, given ``on`` (a
        stage's name), on that stage's own thread, so that its statements do
        not queue behind another stage's (the relay's leases and marks
        overlap the store consumer's writes). SQLite has one writer: one
        thread for all."""
        ex = self._thread(on) if on is not None and self.dialect == "postgresql" else self._executor
        return await asyncio.get_running_loop().run_in_executor(ex, fn)

    async def run_aside(self, fn: Callable[[], T]) -> T:
        """A long read (a count over whole tables) on a thread of its own,
        so that the work queued on ``run`` (the store consumer's writes, the
        relay's leases) does not wait for it."""
        return await asyncio.get_running_loop().run_in_executor(self._thread("aside"), fn)

    def _thread(self, name: str) -> ThreadPoolExecutor:
        ex = self._threads.get(name)
        if ex is None:
            ex = self._threads[name] = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=f"estat-db-{name}"
            )
        return ex

    def close(self) -> None:
        for ex in (self._executor, *self._threads.values()):
            ex.shutdown(wait=True)
        for engine in (self.engine, *self._reserved):
            engine.dispose()

    # -- migrations ------------------------------------------------------------
    def _config(self) -> Config:
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        cfg.set_main_option("sqlalchemy.url", self.url.replace("%", "%%"))
        return cfg

    def head(self) -> str:
        from alembic.script import ScriptDirectory

        head = ScriptDirectory.from_config(self._config()).get_current_head()
        assert head is not None
        return head

    def current(self) -> str | None:
        from alembic.runtime.migration import MigrationContext

        with self.engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    def check_schema(self) -> None:
        """Raise ``SchemaTooNew`` when the database is at a revision this
        estat does not know (a newer estat migrated it)."""
        current = self.current()
        if current is None:
            return
        from alembic.script import ScriptDirectory

        known = {s.revision for s in ScriptDirectory.from_config(self._config()).walk_revisions()}
        if current not in known:
            raise SchemaTooNew(
                f"the database schema is at revision {current}, newer than this estat knows "
                f"(head {self.head()}): upgrade estat, or point DATABASE_URL elsewhere"
            )

    def upgrade(self, revision: str = "head") -> None:
        if revision == "head" and self._at_head():
            return  # every start but the first: no migration tooling loaded
        _when_unlocked(lambda: self._upgrade(revision))

    def _at_head(self) -> bool:
        """The schema is at this estat's newest revision (read with plain
        SQL; alembic and its template engine take ~0.5 s to import)."""
        try:
            with self.engine.connect() as conn:
                got = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
        except DBAPIError:
            return False  # no table yet: a new database
        return got == [HEAD]

    def _upgrade(self, revision: str) -> None:
        from alembic import command

        self.check_schema()
        cfg = self._config()
        deadline = time.monotonic() + MIGRATION_LOCK_PATIENCE
        pause = 0.5
        while True:
            try:
                with self.engine.begin() as conn:
                    if self.dialect == "postgresql":
                        # the workers of a server (and every role) migrate at
                        # start: one at a time, the others then find the schema
                        # at head; then a table lock is waited for a while only
                        conn.execute(
                            text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK}
                        )
                        ms = int(MIGRATION_LOCK_TIMEOUT * 1000)
                        conn.execute(text(f"SET LOCAL lock_timeout = {ms}"))
                    cfg.attributes["connection"] = conn
                    command.upgrade(cfg, revision)
                return
            except DBAPIError as e:
                if getattr(e.orig, "sqlstate", None) != "55P03":  # lock_not_available
                    raise
                blockers = self._lock_holders()
                if time.monotonic() > deadline:
                    raise MigrationBlocked(
                        f"the migration waited {MIGRATION_LOCK_PATIENCE:.0f} s for locks held "
                        f"by other sessions: {blockers or 'gone by now'}; end them (or wait "
                        "for them) and start again"
                    ) from None
                log.warning(
                    "migration waiting: another session holds a lock it needs",
                    blockers=blockers,
                    retryInSeconds=pause,
                )
                time.sleep(pause)
                pause = min(pause * 2, 10.0)

    def _lock_holders(self) -> str:
        """The sessions holding locks on estat's tables (pid, state, since,
        query), for the operator to end or wait for."""
        try:
            with self.engine.connect() as conn:
                rows = conn.execute(
                    text(
                        "SELECT DISTINCT a.pid, a.state, a.xact_start, left(a.query, 80) "
                        "FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
                        "JOIN pg_stat_activity a ON a.pid = l.pid "
                        "WHERE l.granted AND a.pid <> pg_backend_pid() "
                        "AND (c.relname LIKE 'user_activity_%' OR c.relname LIKE 'estat_%' "
                        "OR c.relname LIKE 'message_queue_%' OR c.relname LIKE 'admin_%') "
                        "ORDER BY a.xact_start LIMIT 5"
                    )
                ).all()
        except DBAPIError:
            return ""
        return "; ".join(
            f"pid {p} ({st}, since {t:%H:%M:%S}): {q}" if t else f"pid {p} ({st}): {q}"
            for p, st, t, q in rows
        )

    def downgrade(self, revision: str) -> None:
        from alembic import command

        cfg = self._config()
        with self.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, revision)

    def upgrade_sql(self, revision: str = "head") -> str:
        """The SQL ``upgrade`` would run (``--sql``): from an empty database,
        or ``FROM:TO`` (``0005:head``). On PostgreSQL it starts with the
        lock timeout a migration run by estat has, so that a DBA's
        ``psql -v ON_ERROR_STOP=1 -f`` gives way to a long query instead of
        queueing every statement on the table behind it."""
        from alembic import command

        cfg = self._config()
        out = io.StringIO()
        cfg.output_buffer = out
        command.upgrade(cfg, revision, sql=True)
        if self.dialect != "postgresql":
            return out.getvalue()
        wait = f"{MIGRATION_LOCK_TIMEOUT:g}s"
        return (
            f"-- estat's schema upgrade ({revision}). Apply with: psql -v ON_ERROR_STOP=1 -f FILE\n"
            f"-- A statement waits at most {wait} for a table's lock (a long query holding it\n"
            "-- would otherwise hold every other statement on the table behind this one):\n"
            "-- when it fails on the lock timeout, nothing was changed; run the file again.\n"
            f"SET lock_timeout = '{wait}';\n\n" + out.getvalue()
        )


def _when_unlocked(fn: Callable[[], T], attempts: int = 100) -> T:
    """``fn``, again while SQLite answers "database is locked" at once
    instead of waiting (switching a new file to WAL while another process
    creates it does): the workers of one server migrate one file together."""
    for attempt in range(attempts):
        try:
            return fn()
        except OperationalError as e:
            if "locked" not in str(e) or attempt == attempts - 1:
                raise
            time.sleep(0.05 + random.random() * 0.1)
    raise AssertionError("unreachable")


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # autocommit at the driver; SQLAlchemy's "begin" event issues BEGIN
    # IMMEDIATE, so a writer takes the lock up front and waits for it
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def _sqlite_begin(conn: Connection) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE")
