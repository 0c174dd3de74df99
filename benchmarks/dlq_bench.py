"""DLQ figures for ``make bench``: replay rate into a local lake and into an
S3 endpoint (moto_server), time to pick the next file with 100 and 100,000
files, and start-up time with 100,000 files."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import boto3
import msgspec
from prometheus_client import CollectorRegistry

from estat.clock import SystemClock
from estat.codec import encode
from estat.dlq.queue import DeadLetterQueue
from estat.dlq.store import DiskStore
from estat.errors import RetryableDeliveryError
from estat.lake.sink import local_sink, s3_sink
from estat.model import EncodedBatch
from estat.ops.logging import setup_logging
from estat.ops.metrics import Metrics

ERR = RetryableDeliveryError("bench", error_class="connection")
EVENTS = 1000


def dlq_at(root: Path) -> DeadLetterQueue:
    return DeadLetterQueue(
        DiskStore(root),
        max_bytes=10**12,
        max_age=10**9,
        clock=SystemClock(),
        metrics=Metrics(CollectorRegistry()),
        executor=None,
        quarantine_prefix="raw_dlq",
    )


async def fill(root: Path, files: int) -> int:
    dlq = dlq_at(root)
    data = encode(
        b"".join(
            msgspec.json.encode({"ts": 1, "ip": "81.2.69.160", "body": f"event {i} " + "x" * 250})
            + b"\n"
            for i in range(EVENTS)
        )
    )
    for i in range(files):
        await dlq.spill(
            EncodedBatch(
                f"raw/dt=2026-01-01/hr=00/{i}_b_000000.jsonl.gz", data, EVENTS, 0, 1, 2, {}
            ),
            ERR,
            3,
        )
    return len(data)


async def replay_rate(root: Path, sink: object, files: int) -> tuple[float, float]:
    dlq = dlq_at(root)
    await dlq.start()
    t0 = time.perf_counter()
    n = 0
    while await dlq.replay_one(sink) == "ok":  # type: ignore[arg-type]
        n += 1
    dt = time.perf_counter() - t0
    assert n == files, n
    return n / dt, n * EVENTS / dt


def many_names(root: Path, n: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        stem = f"{1_700_000_000_000_000_000 + i * 1000:019d}-100-5000-{i:08x}"
        (root / f"{stem}.gz").touch()
        (root / f"{stem}.json").touch()


def pick_ms(root: Path) -> float:
    store = DiskStore(root)
    t0 = time.perf_counter()
    for _ in range(20):
        assert store.oldest() is not None
    return (time.perf_counter() - t0) / 20 * 1000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def main() -> None:
    setup_logging("error")
    work = Path(tempfile.mkdtemp(prefix="estat-dlq-bench-"))
    try:
        files = 200
        size = await fill(work / "dlq-local", files)
        fps, eps = await replay_rate(work / "dlq-local", local_sink(work / "lake"), files)
        print(
            f"DLQ replay into a local lake: {fps:,.0f} files/s, {eps:,.0f} events/s "
            f"({files} files of {EVENTS} events, {size:,} bytes each)"
        )

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
            files = 100
            await fill(work / "dlq-s3", files)
            sink = s3_sink("bench", region="us-east-1", endpoint=endpoint, timeout=10)
            fps, eps = await replay_rate(work / "dlq-s3", sink, files)
            print(
                f"DLQ replay into moto_server (S3 protocol): {fps:,.0f} files/s, {eps:,.0f} events/s"
            )
        finally:
            moto.terminate()
            moto.wait(10)

        many_names(work / "small", 100)
        many_names(work / "medium", 1_000)
        many_names(work / "large", 100_000)
        print(
            f"pick the next file (reads at most 1,000 directory entries): "
            f"{pick_ms(work / 'small'):.2f} ms with 100 files, "
            f"{pick_ms(work / 'medium'):.2f} ms with 1,000, "
            f"{pick_ms(work / 'large'):.2f} ms with 100,000"
        )
        t0 = time.perf_counter()
        dlq = dlq_at(work / "large")
        await dlq.start()
        print(
            f"start-up with 100,000 files (recover + gauges): "
            f"{(time.perf_counter() - t0) * 1000:.0f} ms, files={dlq.files}, events={dlq.events}"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
