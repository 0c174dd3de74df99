"""Command line: ``estat serve | config | version``."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from estat import __version__
from estat.errors import ConfigError
from estat.settings import (
    Settings,
    dotenv_notes,
    effective_config,
    load_settings,
    markdown_table,
    raw_config,
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="estat", description="User-activity event collector.")
    p.add_argument("--version", action="version", version=f"estat {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser(
        "serve",
        help="run the collector until SIGTERM/SIGINT",
        description=(
            "Run the collector until SIGTERM/SIGINT. Configuration comes from environment "
            "variables and a .env file in the working directory; `estat config` prints the "
            "effective values and docs/configuration.md lists every variable."
        ),
    )
    s.add_argument(
        "--workers",
        type=int,
        default=None,
        help="worker processes, 1 to 256 (default: one per available core); 1 runs a single process",
    )
    s.add_argument(
        "--roles",
        default=None,
        help="comma-separated roles of this process: ingest, relay, store, dispatch (default: all four)",
    )
    s.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    for role, text in (
        ("relay", "publish the source outbox to the bus until SIGTERM/SIGINT"),
        ("store", "store the bus's events in the database until SIGTERM/SIGINT"),
        (
            "dispatch",
            "send stored events to the destinations (PostHog, webhook) until SIGTERM/SIGINT",
        ),
    ):
        rp_ = sub.add_parser(
            role, help=text, description=text + " (same as serve --roles " + role + ")"
        )
        if role == "store":
            from estat.backfillctl import add_backfill_parser
            from estat.backupctl import add_backup_parser

            store_sub = rp_.add_subparsers(dest="store_command")
            add_backup_parser(store_sub)
            add_backfill_parser(store_sub)
    ob = sub.add_parser("outbox", help="the source outbox: summary, replay FAILED rows")
    osub = ob.add_subparsers(dest="outbox_command", required=True)
    osub.add_parser("summary", help="pendingCount, failedCount, publishedCount, maxRetryCount")
    orp = osub.add_parser(
        "replay", help="make FAILED rows (parked ones too) due now; the relay publishes them"
    )
    orp.add_argument("--limit", type=int, default=100, help="at most N rows, oldest first")
    from estat.adminctl import add_admin_parser

    add_admin_parser(sub)
    from estat.doctor import add_doctor_parser

    add_doctor_parser(sub)
    mg = sub.add_parser("migrate", help="migrate the database (DATABASE_URL) to this version")
    mg.add_argument(
        "action", nargs="?", default="upgrade", choices=["upgrade", "current", "downgrade"]
    )
    mg.add_argument(
        "revision", nargs="?", default=None, help="target revision (downgrade: required)"
    )
    mg.add_argument("--sql", action="store_true", help="print the SQL of the upgrade, run nothing")
    c = sub.add_parser("config", help="print the effective configuration (secrets masked)")
    c.add_argument(
        "--markdown", action="store_true", help="print the configuration reference instead"
    )
    sub.add_parser("version", help="print the version")
    d = sub.add_parser("dlq", help="inspect and operate the local DLQ (safe while serving)")
    dsub = d.add_subparsers(dest="dlq_command", required=True)
    dsub.add_parser("stats", help="files, events, bytes and oldest age")
    ls = dsub.add_parser("ls", help="list DLQ files, oldest first")
    ls.add_argument("--limit", type=int, default=100)
    rp = dsub.add_parser("replay", help="upload DLQ files to the lake now")
    rp.add_argument("--limit", type=int, default=None, help="at most N files")
    rp.add_argument(
        "--dry-run", action="store_true", help="only say what would be replayed, and where to"
    )
    rp.add_argument(
        "--to-current-lake",
        action="store_true",
        help="replay files recorded as bound for another lake to the one configured here",
    )
    pg = dsub.add_parser("purge", help="delete DLQ files older than a duration (data loss)")
    pg.add_argument("--older-than", required=True, help="a duration such as 24h")
    pg.add_argument("--yes", action="store_true", help="confirm the deletion")
    return p


def stale_compiled_modules() -> list[str]:
    """Compiled modules (``make install``) whose ``.py`` changed since: they
    would run old code while the source says otherwise."""
    root = Path(__file__).resolve().parent
    stale = []
    for so in root.glob("**/*.so"):
        py = so.with_name(so.name.split(".", 1)[0] + ".py")
        if py.exists() and py.stat().st_mtime > so.stat().st_mtime:
            stale.append(str(py.relative_to(root.parent)))
    return sorted(stale)


def _print_rows(rows: list[tuple[str, str]], problems: dict[str, str]) -> None:
    """The configuration table; invalid variables are marked with the reason."""
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        line = problems.get(k, "")
        _, sep, why = line.partition(": ")  # NAME=value: why, or a check across variables
        why = why if sep and line.startswith(f"{k}=") else line
        mark = f"   <- INVALID: {why}" if line else ""
        print(f"{k.ljust(width)}  {v}{mark}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "version":
        print(__version__)
        return 0
    if args.command == "admin":
        from estat.adminctl import run_admin_command

        return run_admin_command(args)
    if args.command == "doctor":
        from estat.doctor import run_doctor

        return run_doctor(args)
    if args.command == "config" and args.markdown:
        sys.stdout.write(markdown_table())
        return 0
    if not getattr(args, "reuse_port", False):  # a server's workers: said once, by the server
        for note in dotenv_notes():
            print(f"estat: warning: {note}", file=sys.stderr)
    try:
        settings = load_settings()
    except ConfigError as e:
        if args.command == "config":
            _print_rows(raw_config(), e.problems)
        print(f"estat: {e}", file=sys.stderr)
        return 2
    if args.command == "dlq":
        from estat.dlqctl import run_dlq_command

        return run_dlq_command(settings, args)
    if args.command == "config":
        _print_rows(effective_config(settings), {})
        return 0
    if args.command == "outbox":
        from estat.outboxctl import run_outbox_command

        return run_outbox_command(settings, args)
    if args.command == "migrate":
        return _migrate(settings, args)
    if args.command == "store" and getattr(args, "store_command", None) == "verify-backup":
        from estat.backupctl import run_verify_backup

        return run_verify_backup(settings, args)
    if args.command == "store" and getattr(args, "store_command", None) == "backfill":
        from estat.backfillctl import run_backfill

        return run_backfill(settings, args)
    if args.command in ("relay", "store", "dispatch"):
        args.roles, args.workers, args.reuse_port = args.command, 1, False
    stale = stale_compiled_modules()
    if stale:
        print(
            f"estat: compiled modules older than their source: {', '.join(stale)}; "
            "run `make install` (or ESTAT_NATIVE=0 make install to run them as Python)",
            file=sys.stderr,
        )
        return 2
    # serve: hold SIGTERM/SIGINT until the handlers are installed (see app.serve)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    from estat.activity_app import parse_roles
    from estat.supervisor import MAX_WORKERS, AlreadyRunning, default_workers, lock_instance

    try:
        roles = parse_roles(args.roles)
    except ValueError as e:
        print(f"estat: {e}", file=sys.stderr)
        return 2
    if "ingest" not in roles:
        from estat.process import serve

        return serve(settings, roles=roles)
    workers = args.workers if args.workers is not None else default_workers()
    if not 1 <= workers <= MAX_WORKERS:
        print(f"estat: --workers must be from 1 to {MAX_WORKERS}", file=sys.stderr)
        return 2
    try:
        # a worker of a server runs under its parent's locks
        lock = None if args.reuse_port else lock_instance(settings, address=workers > 1)
    except AlreadyRunning as e:
        print(f"estat: {e}", file=sys.stderr)
        return 2
    if workers == 1:
        from estat.process import serve

        return serve(settings, reuse_port=args.reuse_port, roles=roles)
    from estat.supervisor import run_workers

    assert lock is not None
    return run_workers(settings, workers, roles)


def _migrate(settings: Settings, args: argparse.Namespace) -> int:
    from alembic.util import CommandError  # every migrate action loads alembic anyway
    from sqlalchemy.exc import SQLAlchemyError

    from estat.store.db import Database, MigrationBlocked, SchemaTooNew

    db = Database(**settings.database_args)
    try:
        if args.sql:
            sys.stdout.write(db.upgrade_sql(args.revision or "head"))
        elif args.action == "current":
            print(f"{db.current() or 'empty'} (this estat: {db.head()}) {db.description}")
        elif args.action == "downgrade":
            if not args.revision:
                print(
                    "estat: migrate downgrade needs a revision (base: everything)", file=sys.stderr
                )
                return 2
            db.downgrade(args.revision)
            print(f"downgraded to {args.revision}")
        else:
            db.upgrade(args.revision or "head")
            print(f"database at {db.current()}: {db.description}")
    except SchemaTooNew as e:
        print(f"estat: {e}", file=sys.stderr)
        return 2
    except MigrationBlocked as e:
        print(f"estat: {e}", file=sys.stderr)
        return 1
    except SQLAlchemyError as e:
        print(f"estat: database error: {str(e).splitlines()[0][:300]}", file=sys.stderr)
        return 1
    except CommandError as e:  # a revision alembic does not know
        print(f"estat: {e} (`estat migrate current` names the database's)", file=sys.stderr)
        return 2
    finally:
        db.close()
    return 0
