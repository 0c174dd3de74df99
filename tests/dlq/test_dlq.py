"""The DLQ against a real directory: spill, replay, capacity, TTL, recovery, corruption."""

from __future__ import annotations

import errno
import gzip
import os
from pathlib import Path

import msgspec
import pytest
from prometheus_client import CollectorRegistry

from estat.clock import FakeClock
from estat.codec import decode, encode
from estat.dlq.queue import DeadLetterQueue
from estat.dlq.store import DiskStore, Entry, Meta
from estat.errors import RetryableDeliveryError
from estat.model import EncodedBatch
from estat.ops.metrics import Metrics
from tests.fakes import MemorySink

ERR = RetryableDeliveryError("down", error_class="connection")


def batch(key: str, ids: range, pad: int = 0) -> EncodedBatch:
    data = encode(
        b"".join(msgspec.json.encode({"id": i, "pad": os.urandom(pad).hex()}) + b"\n" for i in ids)
    )
    return EncodedBatch(
        key=key,
        data=data,
        events=len(ids),
        raw_bytes=0,
        first_ts=1,
        last_ts=2,
        metadata={"estat-instance": "t"},
    )


def make(
    root: Path,
    clock: FakeClock,
    *,
    max_bytes: int = 10**9,
    max_age: float = 86400,
    destination: str = "",
) -> tuple[DeadLetterQueue, Metrics]:
    m = Metrics(CollectorRegistry())
    dlq = DeadLetterQueue(
        DiskStore(root),
        max_bytes=max_bytes,
        max_age=max_age,
        clock=clock,
        metrics=m,
        executor=None,
        quarantine_prefix="raw_dlq",
        destination=destination,
    )
    return dlq, m


def files(root: Path) -> list[Path]:
    """The committed DLQ files, oldest first."""
    return sorted(root.glob("*/*.dlq"), key=lambda p: p.name)


def val(m: Metrics, name: str) -> float:
    return m.registry.get_sample_value(name) or 0.0


async def drain(dlq: DeadLetterQueue, sink: MemorySink) -> list[str]:
    results: list[str] = []
    while (r := await dlq.replay_one(sink)) != "empty":
        results.append(r)
        assert len(results) < 1000
    return results


async def test_spill_then_replay_under_the_original_key(tmp_path: Path) -> None:
    clock = FakeClock()
    dlq, m = make(tmp_path, clock)
    await dlq.start()
    assert await dlq.spill(batch("raw/dt=2026-01-01/hr=05/1_a_000001.jsonl.gz", range(5)), ERR, 3)
    clock.advance(1)
    assert await dlq.spill(
        batch("raw/dt=2026-01-01/hr=05/1_a_000002.jsonl.gz", range(5, 8)), ERR, 3
    )
    assert val(m, "dlq_events_enqueued_total") == 8
    assert val(m, "dlq_files_current") == 2
    assert val(m, "dlq_size_bytes") > 0
    sink = MemorySink()
    sink.fail(1)
    assert await dlq.replay_one(sink) == "failed"
    assert val(m, "dlq_files_current") == 2  # kept after a failed upload
    assert await drain(dlq, sink) == ["ok", "ok"]
    # oldest first, original keys (so the original dt=/hr= partition)
    assert list(sink.objects) == [
        "raw/dt=2026-01-01/hr=05/1_a_000001.jsonl.gz",
        "raw/dt=2026-01-01/hr=05/1_a_000002.jsonl.gz",
    ]
    assert [r["id"] for d in sink.objects.values() for r in decode(d)] == list(range(8))
    assert val(m, "dlq_events_reuploaded_total") == 8
    assert val(m, "dlq_files_current") == 0
    assert val(m, "dlq_size_bytes") == 0
    assert list(tmp_path.iterdir()) == []


async def test_capacity_evicts_oldest_and_counts_the_loss(tmp_path: Path) -> None:
    clock = FakeClock()
    one = len(batch("k", range(10), pad=200).data) + 600
    dlq, m = make(tmp_path, clock, max_bytes=one * 2)
    await dlq.start()
    for i in range(3):
        clock.advance(1)
        assert await dlq.spill(batch(f"raw/k{i}", range(i * 10, i * 10 + 10), pad=200), ERR, 3)
    assert val(m, "dlq_events_dropped_total") == 10
    assert dlq.nbytes <= one * 2
    sink = MemorySink()
    await drain(dlq, sink)
    assert sorted(sink.objects) == ["raw/k1", "raw/k2"]  # k0, the oldest, was evicted


async def test_batch_larger_than_capacity_is_dropped_and_counted(tmp_path: Path) -> None:
    dlq, m = make(tmp_path, FakeClock(), max_bytes=100)
    await dlq.start()
    assert await dlq.spill(batch("raw/big", range(50)), ERR, 3)
    assert val(m, "dlq_events_dropped_total") == 50
    assert val(m, "dlq_files_current") == 0


async def test_ttl_expires_old_files(tmp_path: Path) -> None:
    clock = FakeClock()
    dlq, m = make(tmp_path, clock, max_age=3600)
    await dlq.start()
    await dlq.spill(batch("raw/old", range(4)), ERR, 3)
    clock.advance(3000)
    await dlq.spill(batch("raw/new", range(4, 6)), ERR, 3)
    clock.advance(700)  # "old" is now 3700 s old
    sink = MemorySink()
    assert await drain(dlq, sink) == ["ok"]
    assert list(sink.objects) == ["raw/new"]
    assert val(m, "dlq_files_expired_total") == 1
    assert val(m, "dlq_events_expired_total") == 4


async def test_write_error_is_counted_and_reported_unsaved(tmp_path: Path) -> None:
    class FullDisk(DiskStore):
        def write(self, data: bytes, meta: Meta, created_ns: int) -> Entry:
            raise OSError(errno.ENOSPC, "No space left on device")

    m = Metrics(CollectorRegistry())
    dlq = DeadLetterQueue(
        FullDisk(tmp_path),
        max_bytes=10**9,
        max_age=86400,
        clock=FakeClock(),
        metrics=m,
        executor=None,
        quarantine_prefix="raw_dlq",
    )
    assert not await dlq.spill(batch("raw/x", range(3)), ERR, 3)
    assert val(m, "dlq_write_errors_total") == 1
    assert val(m, "dlq_events_enqueued_total") == 0


async def test_restart_recovers_gauges_and_cleans_orphans(tmp_path: Path) -> None:
    clock = FakeClock()
    dlq, _ = make(tmp_path, clock)
    await dlq.start()
    for i in range(3):
        await dlq.spill(batch(f"raw/r{i}", range(i, i + 1)), ERR, 3)
    # a crash mid-write and mid-replay
    first = files(tmp_path)[0]
    (first.parent / ".tmp-0000000000000000001-1-10-dead.dlq").write_bytes(b"half")
    first.rename(str(first) + ".claim")
    again, m2 = make(tmp_path, clock)
    out = await again.start()
    assert out == {"claims_released": 1, "temp_removed": 1, "legacy_migrated": 0}
    assert val(m2, "dlq_files_current") == 3
    assert again.events == 3
    sink = MemorySink()
    assert await drain(again, sink) == ["ok", "ok", "ok"]
    assert sorted(sink.objects) == ["raw/r0", "raw/r1", "raw/r2"]
    assert list(tmp_path.iterdir()) == []


def corruptions() -> list[tuple[str, object]]:
    return [
        ("truncated", lambda d: d[: len(d) // 2]),
        ("flipped", lambda d: d[:20] + bytes([d[20] ^ 0x55]) + d[21:]),
        ("zero_length", lambda d: b""),
        ("not_gzip", lambda d: b"hello, world\n"),
        ("bad_line", lambda d: gzip.compress(b'{"id":1}\n{nope\n{"id":2}\n')),
    ]


@pytest.mark.parametrize(("name", "mutate"), corruptions())
async def test_corrupt_files_are_quarantined_and_the_rest_replayed(
    tmp_path: Path, name: str, mutate: object
) -> None:
    clock = FakeClock()
    dlq, m = make(tmp_path, clock)
    await dlq.start()
    await dlq.spill(batch("raw/a.jsonl.gz", range(0, 50)), ERR, 3)
    clock.advance(1)
    await dlq.spill(batch("raw/b.jsonl.gz", range(50, 100)), ERR, 3)
    victim = files(tmp_path)[0]
    blob = victim.read_bytes()
    head = blob.index(b"\n", blob.index(b"\n") + 1) + 1  # magic line, metadata line
    victim.write_bytes(blob[:head] + mutate(blob[head:]))  # type: ignore[operator]
    sink = MemorySink()
    assert await drain(dlq, sink) == ["quarantined", "ok"]
    assert "raw_dlq/raw/a.jsonl.gz" in sink.objects
    assert [r["id"] for r in decode(sink.objects["raw/b.jsonl.gz"])] == list(range(50, 100))
    assert "raw/a.jsonl.gz" not in sink.objects
    assert val(m, "dlq_files_quarantined_total") == 1
    assert val(m, "dlq_events_quarantined_total") == 50
    assert val(m, "dlq_events_reuploaded_total") == 50


async def test_two_processes_never_replay_the_same_file(tmp_path: Path) -> None:
    clock = FakeClock()
    a, _ = make(tmp_path, clock)
    b, _ = make(tmp_path, clock)
    await a.start()
    for i in range(6):
        clock.advance(1)
        await a.spill(batch(f"raw/p{i}", range(i, i + 1)), ERR, 3)
    entry = a.store.oldest()
    assert entry is not None
    assert a.store.claim(entry)
    assert not b.store.claim(entry)
    a.store.release(entry)
    sink = MemorySink()
    while True:
        ra, rb = await a.replay_one(sink), await b.replay_one(sink)
        if ra == rb == "empty":
            break
    assert sorted(sink.attempts) == sorted(set(sink.attempts))  # every key uploaded once
    assert len(sink.objects) == 6


def test_pick_reads_a_bounded_window(tmp_path: Path) -> None:
    store = DiskStore(tmp_path)
    bucket = tmp_path / "20260101T0000"
    bucket.mkdir()
    for i in range(1500):
        (bucket / f"{i:019d}-1-10-{i:08x}.dlq").touch()
    window = store.window()
    assert 0 < len(window) <= 1000
    assert store.totals()[:3] == (1500, 1500, 15000)
