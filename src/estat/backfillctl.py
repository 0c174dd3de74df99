"""``estat store backfill --from --to``: store again what the bus lost.

Reads the lake's client events (``EVENTS_PREFIX``, the partition hours
overlapping the window) and the source outbox's server events (rows
created in the window) and stores every event the event store lacks, with
its dispatch outbox rows (``estat.activity.backfill``). Safe beside
running consumers and to run twice. Exit status: 0 every event read is
stored (now or before), 1 some could not be (listed) or the lake or the
database failed, 2 a usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

from estat.errors import DeliveryError
from estat.settings import Settings

SOURCES = ("lake", "outbox")


def add_backfill_parser(store_sub: Any) -> None:
    b = store_sub.add_parser(
        "backfill",
        help="store the events of a time window again from the lake and the source outbox "
        "(after the bus lost its data)",
        description=(__doc__ or "").split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    b.add_argument("--from", dest="start", required=True, help="start, ISO 8601 (UTC if no zone)")
    b.add_argument("--to", dest="end", required=True, help="end (excluded), ISO 8601")
    b.add_argument(
        "--source",
        choices=(*SOURCES, "both"),
        default="both",
        help="lake: client events; outbox: server events; both (the default)",
    )
    b.add_argument(
        "--dispatch",
        default="",
        metavar="TARGETS",
        help="also enqueue every event of the window that is stored already for these "
        "destinations (comma-separated, configured ones; a destination added later) unless "
        "it has a dispatch row for them",
    )
    b.add_argument(
        "--dry-run", action="store_true", help="count what would be stored, store nothing"
    )
    b.add_argument("--json", action="store_true", help="print the result as JSON")


def _instant(text: str) -> datetime:
    t = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


def run_backfill(settings: Settings, args: argparse.Namespace) -> int:
    try:
        start, end = _instant(args.start), _instant(args.end)
    except ValueError as e:
        print(f"estat: --from / --to: {e}", file=sys.stderr)
        return 2
    if end <= start:
        print("estat: --to must be after --from", file=sys.stderr)
        return 2
    dispatch = tuple(
        dict.fromkeys(t.strip().upper() for t in args.dispatch.split(",") if t.strip())
    )
    unknown = [t for t in dispatch if t not in settings.targets]
    if unknown:
        configured = ", ".join(settings.targets) or "none"
        print(
            f"estat: --dispatch {','.join(unknown)}: not a configured destination "
            f"(DISPATCH_TARGETS: {configured}); its rows would never be sent",
            file=sys.stderr,
        )
        return 2
    from sqlalchemy.exc import SQLAlchemyError

    from estat.activity.backfill import Backfill, Tally, from_lake, from_outbox, hour_prefixes
    from estat.activity.consumer import LEDGER_DATASET
    from estat.ops.ledger import hour_bounds
    from estat.store import ledger
    from estat.store.db import Database
    from estat.store.events import EventStore
    from estat.wiring import build_sink

    db = Database(**settings.database_args)
    tz = ZoneInfo(settings.partition_tz)
    stored: dict[tuple[str, int, str], int] = {}

    def count(n: int) -> None:  # the completeness ledger: stored, by the hour it is stored
        key = (LEDGER_DATASET, hour_bounds(datetime.now(UTC).timestamp(), tz)[0], "stored")
        stored[key] = stored.get(key, 0) + n

    tallies: list[Tally] = []
    failed = ""
    try:
        if db.current() != db.head():
            print(
                f"estat: the database schema is at {db.current()}, this estat needs "
                f"{db.head()}: run `estat migrate`",
                file=sys.stderr,
            )
            return 1
        fill = Backfill(
            EventStore(db, settings.targets),
            batch_size=settings.store_batch_size,
            dry_run=args.dry_run,
            on_stored=count,
            dispatch=dispatch,
        )
        if args.source in ("lake", "both"):
            sink = build_sink(settings, timeout=max(settings.s3_timeout, 60.0))
            prefixes = hour_prefixes(settings.events_prefix, start, end, tz)
            tallies.append(Tally("lake"))
            progress = None if args.json else _progress
            asyncio.run(from_lake(fill, sink, prefixes, tallies[-1], progress))
        if args.source in ("outbox", "both"):
            tallies.append(Tally("outbox"))
            from_outbox(fill, start, end, tallies[-1])
    except DeliveryError as e:
        failed = f"the lake ({e.error_class}): {str(e).splitlines()[0][:300]}"
    except SQLAlchemyError as e:
        failed = f"the database: {str(e).splitlines()[0][:300]}"
    finally:
        if stored:
            try:
                ledger.add(db, stored, datetime.now(UTC))
            except SQLAlchemyError as e:
                print(f"estat: completeness ledger not updated: {e}", file=sys.stderr)
        db.close()
    _report(tallies, args, start, end)
    if failed:
        print(
            f"estat: backfill stopped: {failed} (what is reported above is stored)", file=sys.stderr
        )
        return 1
    return 1 if any(t.unreadable for t in tallies) else 0


def _progress(prefix: str, tally: Any) -> None:
    print(
        f"estat: {prefix} read ({tally.read:,} events so far, {tally.inserted:,} missing)",
        file=sys.stderr,
        flush=True,
    )


def _report(tallies: list[Any], args: argparse.Namespace, start: datetime, end: datetime) -> None:
    if args.json:
        print(
            json.dumps(
                {
                    "from": start.isoformat(),
                    "to": end.isoformat(),
                    "dryRun": args.dry_run,
                    "sources": [t.as_json() for t in tallies],
                }
            )
        )
        return
    verb = "would store" if args.dry_run else "stored"
    for t in tallies:
        unit = ("object" if t.source == "lake" else "page") + ("" if t.objects == 1 else "s")
        print(
            f"{t.source}: {t.objects} {unit}, {t.read} events read, {verb} {t.inserted}, "
            f"already stored {t.duplicates}, unreadable {t.unreadable}"
        )
        if t.dispatch:
            enqueued = ", ".join(f"{k}={v}" for k, v in t.dispatch.items())
            print(f"  dispatch rows {'to enqueue' if args.dry_run else 'enqueued'}: {enqueued}")
        for ex in t.examples:
            print(f"  unreadable: {ex}")
