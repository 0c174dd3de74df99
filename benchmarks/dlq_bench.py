"""DLQ figures for ``make bench``.

- replay of 100,000 small files (5 events each, the format estat writes)
  into a local lake, completely, on ext4 and (as root) on tmpfs;
- replay into an S3 endpoint (moto_server over HTTP: a protocol endpoint
  that tops out near 200-280 PUT/s here, so 2,000 files);
- start-up time and peak RSS, and the time to pick the next file, with
  100,000 files;
- spill rate while the lake hangs: batches that reach the DLQ per second
  through the uploaders once the lake's circuit is open.

``--million`` adds the 1,000,000-file run (start-up, RSS, pick, and a full
replay; about half an hour on this machine), ``make bench-dlq-million``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import boto3
from prometheus_client import CollectorRegistry

from estat.clock import SystemClock
from estat.codec import encode
from estat.dlq.queue import DeadLetterQueue
from estat.dlq.store import DATA, DiskStore, Meta, bucket_of
from estat.errors import RetryableDeliveryError
from estat.lake.sink import local_sink, s3_sink
from estat.model import Batch
from estat.ops.logging import setup_logging
from estat.ops.metrics import Metrics
from estat.pipeline.gate import LakeGate
from estat.pipeline.uploader import Uploader, UploadPolicy

ERR = RetryableDeliveryError("bench", error_class="connection_refused")
EVENTS = 5
PER_BUCKET = 2_000  # files per minute directory: 33 files/s of spills


def dlq_at(root: Path) -> DeadLetterQueue:
    return DeadLetterQueue(
        DiskStore(root),
        max_bytes=10**13,
        max_age=10**9,
        clock=SystemClock(),
        metrics=Metrics(CollectorRegistry()),
        executor=None,
        quarantine_prefix="raw_dlq",
        destination="bench",
    )


def seed(root: Path, n: int) -> float:
    """``n`` committed DLQ files as estat writes them (without the fsyncs,
    to seed fast); returns the seconds it took."""
    store = DiskStore(root)
    data = encode(
        b"".join(b'{"ts":1,"ip":"81.2.69.160","body":"event %d"}\n' % i for i in range(EVENTS))
    )
    base = time.time_ns() - (n // PER_BUCKET + 2) * 60 * 10**9
    t0 = time.perf_counter()
    for i in range(n):
        created = base + (i // PER_BUCKET) * 60 * 10**9 + i
        meta = Meta(
            f"raw/dt=2026-01-01/hr=00/{i}_b_000000.jsonl.gz",
            EVENTS, 1, 2, 3, "connection_refused", "bench", created / 1e9, "bench",
        )  # fmt: skip
        blob = store.encode(data, meta)
        d = root / bucket_of(created)
        if i % PER_BUCKET == 0:
            d.mkdir(exist_ok=True)
        with open(d / (store.new_stem(created, EVENTS, len(blob)) + DATA), "wb") as f:
            f.write(blob)
    return time.perf_counter() - t0


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def start_and_replay(root: Path, sink: object, files: int, label: str) -> None:
    t0 = time.perf_counter()
    dlq = dlq_at(root)
    await dlq.start()
    start_s = time.perf_counter() - t0
    assert dlq.files == files, dlq.files
    store = DiskStore(root)
    t0 = time.perf_counter()
    for _ in range(20):
        assert store.oldest() is not None
    pick_ms = (time.perf_counter() - t0) / 20 * 1000
    print(
        f"{label}: start-up {start_s:.2f} s (peak RSS {rss_mb():.0f} MB), "
        f"pick {pick_ms:.2f} ms (one directory window)"
    )
    t0 = time.perf_counter()
    n = 0
    while (r := await dlq.replay_one(sink)) != "empty":  # type: ignore[arg-type]
        assert r == "ok", r
        n += 1
    dt = time.perf_counter() - t0
    assert n == files, n
    print(f"{label}: replayed all {n:,} files in {dt:.0f} s: {n / dt:,.0f} files/s, "
          f"{n * EVENTS / dt:,.0f} events/s")  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def moto_replay(work: Path, files: int) -> None:
    port = free_port()
    exe = shutil.which("moto_server", path=str(Path(sys.executable).parent))
    assert exe is not None
    moto = subprocess.Popen(
        [exe, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        endpoint = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                boto3.client(
                    "s3",
                    endpoint_url=endpoint,
                    region_name="us-east-1",
                    aws_access_key_id="b",
                    aws_secret_access_key="b",
                ).create_bucket(Bucket="bench")
                break
            except Exception:
                time.sleep(0.1)
        os.environ["AWS_ACCESS_KEY_ID"] = "b"
        os.environ["AWS_SECRET_ACCESS_KEY"] = "b"
        seed(work / "dlq-s3", files)
        sink = s3_sink("bench", region="us-east-1", endpoint=endpoint, timeout=10)
        await start_and_replay(work / "dlq-s3", sink, files, f"{files:,} files → moto_server")
    finally:
        moto.terminate()
        moto.wait(10)


async def spill_rate(work: Path, batches: int = 400, events: int = 500) -> None:
    """Uploaders against a lake that accepts connections and never answers."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1024)
        m = Metrics(CollectorRegistry())
        clock = SystemClock()
        gate = LakeGate(
            threshold=5, probe_interval=5, max_probe_interval=60, clock=clock, metrics=m
        )
        dlq = dlq_at(work / "dlq-spill")
        await dlq.start()
        inbox: asyncio.Queue[Batch] = asyncio.Queue()
        up = Uploader(
            inbox,
            s3_sink("b", region="us-east-1", endpoint=f"http://127.0.0.1:{silent.getsockname()[1]}", timeout=1),
            policy=UploadPolicy.with_retries(2, attempt_timeout=1.0),
            concurrency=4,
            executor=None,
            clock=clock,
            metrics=m,
            instance="bench",
            encode=encode,
            spill=dlq,
            gate=gate,
        )  # fmt: skip
        line = b'{"ts":1,"ip":"81.2.69.160","body":"%s"}\n' % (b"x" * 200)
        up.start(lambda name, coro: asyncio.create_task(coro, name=name))
        t0 = time.perf_counter()
        for i in range(batches):
            await inbox.put(Batch(f"raw/{i}", line * events, events, 1, 2))
        while dlq.files < batches:
            await asyncio.sleep(0.01)
        dt = time.perf_counter() - t0
        await up.stop()
        await up.wait(10)
        print(
            f"spill while the lake hangs (S3_TIMEOUT=1s, 4 uploaders, circuit after 5 failures): "
            f"{batches} batches of {events} events in {dt:.1f} s: {batches / dt:,.0f} batches/s, "
            f"{batches * events / dt:,.0f} events/s"
        )


def mount_tmpfs(where: Path, size: str) -> bool:
    if os.geteuid() != 0:
        return False
    where.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          check=False).returncode == 0  # fmt: skip


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--million", action="store_true", help="also the 1,000,000-file run")
    ap.add_argument("--files", type=int, default=100_000)
    args = ap.parse_args()
    setup_logging("error")
    work = Path(tempfile.mkdtemp(prefix="estat-dlq-bench-", dir=os.environ.get("BENCH_DIR")))
    try:
        n = args.files
        secs = seed(work / "dlq-ext4", n)
        print(f"seeded {n:,} files of {EVENTS} events in {secs:.0f} s")
        await start_and_replay(work / "dlq-ext4", local_sink(work / "lake"), n,
                               f"{n:,} files → local lake (disk)")  # fmt: skip
        tmp = work / "tmpfs"
        if mount_tmpfs(tmp, "2g"):
            try:
                seed(tmp / "dlq", n)
                await start_and_replay(tmp / "dlq", local_sink(tmp / "lake"), n,
                                       f"{n:,} files → local lake (tmpfs)")  # fmt: skip
            finally:
                subprocess.run(["umount", "-l", str(tmp)], check=False)
        await moto_replay(work, 2_000)
        await spill_rate(work)
        if args.million:
            secs = seed(work / "dlq-million", 1_000_000)
            print(f"seeded 1,000,000 files in {secs:.0f} s")
            await start_and_replay(work / "dlq-million", local_sink(work / "lake-million"),
                                   1_000_000, "1,000,000 files → local lake (disk)")  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
