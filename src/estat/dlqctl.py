"""``estat dlq stats | ls | replay | purge``: the DLQ for operators.

Every command is safe while the server runs on the same directory: replay
claims each file by renaming it (a file is never uploaded by two processes
at once, and a re-upload writes the same key), purge deletes only committed
files, and stats and ls only read names.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry

from estat.app import build_dlq, build_sink
from estat.clock import SystemClock
from estat.dlq.queue import Sink
from estat.dlq.store import DiskStore
from estat.ops.logging import setup_logging
from estat.ops.metrics import Metrics
from estat.settings import Settings, parse_duration


def _human(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def run_dlq_command(settings: Settings, args: argparse.Namespace) -> int:
    store = DiskStore(settings.dlq_path)
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
        entries = sorted(store.scan(None), key=lambda e: e.stem)[: args.limit]
        print(f"{'created (UTC)':<20}  {'events':>7}  {'bytes':>10}  file")
        for e in entries:
            created = datetime.fromtimestamp(e.created, UTC).strftime("%Y-%m-%d %H:%M:%S")
            print(f"{created:<20}  {e.events:>7}  {e.nbytes:>10}  {e.stem}.gz")
        return 0
    if cmd == "purge":
        if not args.yes:
            print("estat: purge deletes data; add --yes to confirm")
            return 2
        cutoff = time.time() - parse_duration(args.older_than)
        removed = events = 0
        for e in list(store.scan(None)):
            if e.created < cutoff and store.delete(e, False):
                removed += 1
                events += e.events
        print(f"purged {removed} files ({events} events)")
        return 0
    # replay
    setup_logging(settings.log_level, pretty=settings.log_pretty, env=settings.deploy_env)
    return asyncio.run(_replay(settings, store, args.limit, args.dry_run))


async def _replay(settings: Settings, store: DiskStore, limit: int | None, dry_run: bool) -> int:
    if dry_run:
        entries = sorted(store.scan(None), key=lambda e: e.stem)
        if limit is not None:
            entries = entries[:limit]
        for e in entries:
            print(f"would replay {e.stem}.gz ({e.events} events)")
        print(f"{len(entries)} files would be replayed")
        return 0
    dlq = build_dlq(settings, store, SystemClock(), Metrics(CollectorRegistry()), None)
    await dlq.resync()
    sink: Sink = build_sink(settings)
    done = {"ok": 0, "quarantined": 0, "failed": 0}
    while limit is None or done["ok"] + done["quarantined"] < limit:
        result = await dlq.replay_one(sink)
        if result == "empty":
            break
        if result == "failed":
            done["failed"] += 1
            break  # the lake is failing: stop, the files stay
        if result in done:
            done[result] += 1
    print(
        f"replayed {done['ok']} files, quarantined {done['quarantined']}, failed {done['failed']}"
    )
    return 1 if done["failed"] else 0
