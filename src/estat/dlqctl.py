"""``estat dlq stats | ls | replay | purge``: the DLQ for operators.

Every command is safe while the server runs on the same directory: replay
claims each file by renaming it (a file is never uploaded by two processes
at once, and a re-upload writes the same key), purge deletes only committed
files, and stats and ls only read names. No command creates the directory:
one that does not exist is reported (status 1), since it usually means the
shell's ``DLQ_DIR`` / ``DATA_DIR`` is not the service's.

Every DLQ file records the lake it was bound for; ``replay`` refuses to send
a file to another lake than the one configured in this shell unless
``--to-current-lake`` is given.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
import time
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry

from estat.clock import SystemClock
from estat.dlq.queue import WrongDestination
from estat.dlq.store import DiskStore
from estat.errors import ConfigError
from estat.ops.ledger import Ledger
from estat.ops.logging import setup_logging
from estat.ops.metrics import Metrics
from estat.settings import Settings, parse_duration
from estat.wiring import build_dlq, build_sink


def _human(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def _fail(message: str) -> int:
    print(f"estat: {message}", file=sys.stderr)
    return 1


def run_dlq_command(settings: Settings, args: argparse.Namespace) -> int:
    store = DiskStore(settings.dlq_path, create=False)
    if not store.exists():
        return _fail(
            f"DLQ directory {settings.dlq_path} does not exist "
            "(nothing was ever spilled there, or DLQ_DIR / DATA_DIR differ from the service's)"
        )
    cmd = args.dlq_command
    if cmd == "stats":
        files, events, nbytes, oldest = store.totals()
        age = _human(time.time() - oldest) if oldest is not None else "-"
        print(f"dir     {store.root}")
        print(f"files   {files}")
        print(f"events  {events}")
        print(f"bytes   {nbytes}")
        print(f"oldest  {age}")
        return 0
    if cmd == "ls":
        print(f"{'created (UTC)':<20}  {'events':>7}  {'bytes':>10}  file")
        # bucket by bucket, oldest first
        for e in itertools.islice(store.ordered(), max(0, args.limit)):
            created = datetime.fromtimestamp(e.created, UTC).strftime("%Y-%m-%d %H:%M:%S")
            print(f"{created:<20}  {e.events:>7}  {e.nbytes:>10}  {e.name}")
        return 0
    if cmd == "purge":
        if not args.yes:
            print("estat: purge deletes data; add --yes to confirm")
            return 2
        try:
            cutoff = time.time() - parse_duration(args.older_than)
        except (ConfigError, ValueError) as err:
            return _fail(f"--older-than: {err}")
        removed = events = 0
        for e in list(store.scan()):
            if e.created < cutoff and store.delete(e, False):
                removed += 1
                events += e.events
        print(f"purged {removed} files ({events} events)")
        return 0
    # replay
    setup_logging(settings.log_level, pretty=settings.log_pretty, env=settings.deploy_env)
    return asyncio.run(_replay(settings, store, args))


async def _replay(settings: Settings, store: DiskStore, args: argparse.Namespace) -> int:
    limit: int | None = args.limit
    sink = build_sink(settings)
    here = sink.description
    if args.dry_run:
        n = 0
        for e in store.ordered():
            if limit is not None and n >= limit:
                break
            _, meta = store.read(e, claimed=False)
            bound = (meta.destination if meta else "") or "(not recorded)"
            note = "" if bound in (here, "(not recorded)") else "  [other lake: refused]"
            print(f"would replay {e.name} ({e.events} events) bound for {bound} → {here}{note}")
            n += 1
        print(f"{n} files would be replayed to {here}")
        return 0
    dlq = build_dlq(settings, store, SystemClock(), Metrics(CollectorRegistry()), None, here)
    dlq.ledger = Ledger(settings.partition_tz)  # what reaches the lake, for completeness
    await dlq.resync()
    done = {"ok": 0, "quarantined": 0, "failed": 0}
    try:
        while limit is None or done["ok"] + done["quarantined"] < limit:
            try:
                result = await dlq.replay_one(sink, same_destination=not args.to_current_lake)
            except WrongDestination as e:
                print(
                    f"replayed {done['ok']} files, quarantined {done['quarantined']}; stopped",
                    file=sys.stderr,
                )
                return _fail(str(e))
            if result == "empty":
                break
            if result == "failed":
                done["failed"] += 1
                break  # the lake is failing: stop, the files stay
            if result in done:
                done[result] += 1
    finally:
        _count_in_the_ledger(settings, dlq.ledger)
    print(
        f"replayed {done['ok']} files, quarantined {done['quarantined']}, "
        f"failed {done['failed']} (to {here})"
    )
    return 1 if done["failed"] else 0


def _count_in_the_ledger(settings: Settings, ledger: Ledger) -> None:
    """The replayed objects and their events into the completeness ledger,
    as a server's replay counts them: without it their hours kept a gap
    (``EstatCompletenessGap``) and never got a ``_MANIFEST.json``."""
    counts, objects = ledger.take(), ledger.take_objects()
    if not counts and not objects:
        return
    from sqlalchemy.exc import SQLAlchemyError

    from estat.store import ledger as store_ledger
    from estat.store.db import Database

    now = datetime.now(UTC)
    db = Database(**settings.database_args)
    try:
        store_ledger.add_objects(db, objects, ledger.tz, now)
        store_ledger.add(db, counts, now)
    except SQLAlchemyError as e:
        events = sum(o.events for o in objects)
        print(
            f"estat: the completeness ledger was not updated ({str(e).splitlines()[0][:200]}): "
            f"the {events} events replayed are in the lake, but their hours still show a gap",
            file=sys.stderr,
        )
    finally:
        db.close()
