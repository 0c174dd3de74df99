"""The DLQ at scale: every file is reached by replay, TTL and eviction, in
any directory order, and eviction cannot spin.

The shapes that broke the flat layout (a scan window holding only metadata
names; eviction finding no victim in its window) are forced with a small
window (``DiskStore.scan_limit``) and a few thousand files.
"""

from __future__ import annotations

import asyncio
import gzip
import os
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest

from estat.clock import FakeClock
from estat.codec import decode
from estat.dlq.queue import DeadLetterQueue
from estat.dlq.store import DiskStore, Meta
from tests.dlq.test_dlq import ERR, batch, files, make, val
from tests.fakes import MemorySink


async def replay_all(dlq: DeadLetterQueue, sink: MemorySink, bound: int) -> list[str]:
    out: list[str] = []
    while (r := await dlq.replay_one(sink)) != "empty":
        out.append(r)
        assert len(out) <= bound, "replay does not end"
    return out


async def test_thousands_of_files_over_many_buckets_all_replayed(tmp_path: Path) -> None:
    clock = FakeClock()
    dlq, m = make(tmp_path, clock)
    dlq.store.scan_limit = 7  # a window far smaller than a bucket
    n = 1200
    for i in range(n):
        assert await dlq.spill(batch(f"raw/{i:05d}.jsonl.gz", range(i * 5, i * 5 + 5)), ERR, 3)
        clock.advance(5)  # 12 files per minute: 100 buckets
    assert len({p.parent for p in files(tmp_path)}) >= 100
    sink = MemorySink()
    assert await replay_all(dlq, sink, n) == ["ok"] * n
    assert len(sink.objects) == n
    ids = sorted(r["id"] for d in sink.objects.values() for r in decode(d))
    assert ids == list(range(n * 5))
    assert val(m, "dlq_events_reuploaded_total") == n * 5
    assert val(m, "dlq_files_current") == 0
    # oldest minute first: no upload precedes one of a file from an older minute
    minute = [(1_700_000_000 + 5 * int(k[4:9])) // 60 for k in sink.attempts]
    assert minute == sorted(minute)
    assert list(tmp_path.iterdir()) == []  # emptied buckets are removed


def seed_legacy(root: Path, n: int, events: int = 5) -> None:
    """The flat layout of earlier versions: ``<stem>.json`` + ``<stem>.gz``."""
    root.mkdir(parents=True, exist_ok=True)
    enc = msgspec.json.Encoder()
    base = 1_700_000_000 * 10**9
    for i in range(n):
        data = gzip.compress(
            b"".join(b'{"id":%d}\n' % (i * events + j) for j in range(events)), mtime=0
        )
        meta = Meta(f"raw/legacy/{i}.jsonl.gz", events, 1, 2, 3, "connection", "old", 0.0)
        stem = f"{base + i * 10**6:019d}-{events}-{len(data) + 200}-{i:08x}"
        (root / f"{stem}.json").write_bytes(enc.encode(meta))
        (root / f"{stem}.gz").write_bytes(data)


async def test_flat_layout_of_earlier_versions_is_migrated_and_replayed(tmp_path: Path) -> None:
    seed_legacy(tmp_path, 3000)
    (tmp_path / "0000000000000000005-1-10-beef.json").write_bytes(b"{}")  # orphan metadata
    dlq, m = make(tmp_path, FakeClock(start=1_700_000_100))
    dlq.store.scan_limit = 10
    out = await dlq.start()
    assert out["legacy_migrated"] == 3000
    assert not list(tmp_path.glob("*.gz"))
    assert not list(tmp_path.glob("*.json"))
    assert val(m, "dlq_files_current") == 3000
    sink = MemorySink()
    assert await replay_all(dlq, sink, 3000) == ["ok"] * 3000
    ids = sorted(r["id"] for d in sink.objects.values() for r in decode(d))
    assert ids == list(range(15000))


async def test_ttl_reaches_every_file(tmp_path: Path) -> None:
    clock = FakeClock()
    dlq, m = make(tmp_path, clock, max_age=3600)
    dlq.store.scan_limit = 3
    for i in range(300):
        await dlq.spill(batch(f"raw/{i}", range(i, i + 1)), ERR, 3)
        clock.advance(1)  # five buckets
    clock.advance(7200)
    await dlq.spill(batch("raw/fresh", range(1000, 1002)), ERR, 3)
    sink = MemorySink()
    assert await replay_all(dlq, sink, 300) == ["ok"]
    assert list(sink.objects) == ["raw/fresh"]
    assert val(m, "dlq_files_expired_total") == 300
    assert val(m, "dlq_events_expired_total") == 300


async def test_eviction_reaches_past_the_window_and_counts_exactly(tmp_path: Path) -> None:
    clock = FakeClock()
    one = len(batch("k", range(5), pad=300).data) + 600
    dlq, m = make(tmp_path, clock, max_bytes=one * 1000)
    dlq.store.scan_limit = 4
    for i in range(400):
        await dlq.spill(batch(f"raw/{i}", range(i * 5, i * 5 + 5), pad=300), ERR, 3)
        clock.advance(0.5)
    held_before = dlq.nbytes
    # the capacity shrinks under what is held: the next spill evicts the oldest
    dlq.max_bytes = held_before // 2
    t0 = time.perf_counter()
    assert await dlq.spill(batch("raw/new", range(10_000, 10_005), pad=300), ERR, 3)
    assert time.perf_counter() - t0 < 30
    assert dlq.nbytes <= dlq.max_bytes
    left = {int(p.read_bytes().split(b'"key":"raw/')[1].split(b'"')[0]) for p in files(tmp_path)
            if b"raw/new" not in p.read_bytes()}  # fmt: skip
    evicted = set(range(400)) - left
    assert evicted

    def minute(i: int) -> float:
        return (1_700_000_000 + 0.5 * i) // 60

    # oldest first, to the minute: no survivor is older than an evicted file's minute
    assert max(map(minute, evicted)) <= min(map(minute, left))
    assert val(m, "dlq_events_dropped_total") == 5 * len(evicted)


async def test_nothing_evictable_refuses_the_batch_without_spinning(tmp_path: Path) -> None:
    clock = FakeClock()
    dlq, m = make(tmp_path, clock)
    await dlq.start()
    for i in range(3):
        assert await dlq.spill(batch(f"raw/{i}", range(i * 5, i * 5 + 5), pad=300), ERR, 3)
        clock.advance(1)
    dlq.max_bytes = dlq.nbytes + 100  # full
    # every victim it picks is gone before it can delete it (another process
    # won each race): nothing frees room
    dlq.store.delete = lambda e, claimed: False  # type: ignore[method-assign]
    windows = 0
    real_window = dlq.store.window

    def counting_window(limit: int | None = None) -> list:  # type: ignore[type-arg]
        nonlocal windows
        windows += 1
        return real_window(limit)

    dlq.store.window = counting_window  # type: ignore[method-assign]
    saved = await asyncio.wait_for(
        dlq.spill(batch("raw/new", range(100, 105), pad=300), ERR, 3), 10
    )
    assert saved is False
    assert windows <= 2
    assert val(m, "dlq_spills_refused_total") == 1
    assert val(m, "dlq_events_dropped_total") == 0


async def test_a_vanished_directory_heals_when_it_comes_back(tmp_path: Path) -> None:
    root = tmp_path / "dlq"
    clock = FakeClock()
    dlq, m = make(root, clock)
    await dlq.start()
    assert await dlq.spill(batch("raw/a", range(0, 3)), ERR, 3)
    away = tmp_path / "away"
    root.rename(away)  # a detached volume
    assert await dlq.spill(batch("raw/b", range(3, 6)), ERR, 3) is False
    assert val(m, "dlq_write_errors_total") == 1
    sink = MemorySink()
    assert await dlq.replay_one(sink) == "failed"
    assert not root.exists()  # never re-created under the mount point
    away.rename(root)
    clock.advance(60)
    assert await dlq.spill(batch("raw/b", range(3, 6)), ERR, 3)
    assert sorted(await replay_all(dlq, sink, 5)) == ["ok", "ok"]
    ids = sorted(r["id"] for d in sink.objects.values() for r in decode(d))
    assert ids == list(range(6))


@pytest.mark.parametrize("errno_", [24, 5])  # EMFILE, EIO
async def test_any_write_failure_is_reported_not_raised(tmp_path: Path, errno_: int) -> None:
    dlq, m = make(tmp_path, FakeClock())
    await dlq.start()

    def broken(*_: Any) -> Any:
        raise OSError(errno_, os.strerror(errno_))

    dlq.store.write = broken  # type: ignore[method-assign,assignment]
    assert await dlq.spill(batch("raw/a", range(3)), ERR, 3) is False
    dlq.store.totals = broken  # type: ignore[method-assign]
    dlq.store.window = broken  # type: ignore[method-assign,assignment]
    dlq._resynced_at = -1e9  # the periodic resync fails as well
    assert await dlq.spill(batch("raw/a", range(3)), ERR, 3) is False
    assert await dlq.replay_one(MemorySink()) == "failed"
    assert val(m, "dlq_write_errors_total") == 2


def test_totals_reread_only_changed_buckets(tmp_path: Path) -> None:
    store = DiskStore(tmp_path)
    for b in range(50):
        d = tmp_path / f"2026010{1 + b // 24 % 9}T{b % 24:02d}00"
        d.mkdir(exist_ok=True)
        for i in range(20):
            (d / f"{b * 100 + i:019d}-2-10-{i:08x}.dlq").touch()
        old = time.time_ns() - 10**10
        os.utime(d, ns=(old, old))
    old = time.time_ns() - 10**10
    os.utime(tmp_path, ns=(old, old))
    assert store.totals()[:3] == (1000, 2000, 10000)
    scanned: list[str] = []
    real = store._scan_bucket

    def spy(bucket: str, limit: int | None):  # type: ignore[no-untyped-def]
        scanned.append(bucket)
        return real(bucket, limit)

    store._scan_bucket = spy  # type: ignore[method-assign]
    assert store.totals()[:3] == (1000, 2000, 10000)
    assert scanned == []
    victim = sorted(tmp_path.iterdir())[0]
    next(victim.iterdir()).unlink()
    assert store.totals()[:3] == (999, 1998, 9990)
    assert scanned == [victim.name]
