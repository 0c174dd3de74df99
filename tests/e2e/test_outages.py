"""Long and odd lake outages, as a real process with a loss oracle: every
acknowledged id ends exactly once in the lake or the DLQ, or is counted as
lost by the metric that says so."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from estat.codec import decode
from estat.dlq.store import DiskStore
from tests.conftest import EstatProcess, MotoServer, free_port
from tests.e2e.load import LoadResult, post_collect, run_load
from tests.e2e.test_serve import ids_in, load, s3_objects

pytestmark = pytest.mark.e2e


def dlq_ids(root: Path) -> Counter[str]:
    store = DiskStore(root, create=False)
    seen: Counter[str] = Counter()
    for f in root.glob("*/*.dlq"):
        data, _ = store.decode(f.read_bytes())
        for rec in decode(data):
            seen[json.loads(rec["body"])["id"]] += 1
    return seen


def ready(p: EstatProcess) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(p.admin_url + "/ready", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def until(cond: Callable[[], bool], timeout: float = 30, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.1)


def outage_env(port: int, **extra: str) -> dict[str, str]:
    return {
        "RAW_BUCKET": "estat-outage",
        "S3_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "S3_TIMEOUT": "1s",
        "S3_APP_RETRIES": "0",
        "BATCH_SIZE": "50",
        "FLUSH_INTERVAL": "1s",
        "LAKE_FAILURE_THRESHOLD": "2",
        "LAKE_PROBE_INTERVAL": "1s",
        "LAKE_PROBE_MAX_INTERVAL": "2s",
        "SHUTDOWN_TIMEOUT": "8s",
        **extra,
    }


def test_startup_check_reports_a_missing_bucket(estat_factory: Any, moto: MotoServer) -> None:
    env = {"RAW_BUCKET": "estat-never-created", "S3_ENDPOINT_URL": moto.endpoint}
    p: EstatProcess = estat_factory(env)
    p.start()
    status, body = ready(p)
    assert status == 200  # accepting is still safe: the DLQ absorbs
    assert body["lake"] == "unreachable: no_such_bucket"
    assert p.metrics()["lake_healthy"] == 0
    assert "lake check failed" in p.log.read_text()
    assert p.stop() == 0
    strict: EstatProcess = estat_factory({**env, "LAKE_STARTUP_CHECK": "require"})
    strict.start(wait=False)
    assert strict.proc is not None
    assert strict.proc.wait(30) == 2
    assert "LAKE_STARTUP_CHECK=require" in strict.log.read_text()


def test_dlq_directory_gone_then_back_then_lake_back_loses_nothing(
    estat_factory: Any, tmp_path: Path
) -> None:
    port = free_port()
    p: EstatProcess = estat_factory(outage_env(port))
    p.start()
    acked: set[str] = set()
    first = load(p, connections=4, per=50)  # the lake is down: all of it spills
    acked |= first.acked
    until(lambda: p.metrics()["dlq_events_enqueued_total"] == len(first.acked), what="spilled")
    dlq = tmp_path / "data" / "dlq"
    away = tmp_path / "dlq-away"
    dlq.rename(away)  # the volume is detached
    during = load(p, connections=2, per=100)
    acked |= during.acked
    until(lambda: p.metrics()["pipeline_accepting"] == 0, what="refusing")
    status, body = ready(p)
    assert status == 503
    assert body["dlq"] == "unwritable"
    refused = load(p, connections=1, per=20)
    assert refused.statuses == {503: 20}  # fail closed: nothing accepted it cannot save
    m = p.metrics()
    key = 'http_requests_refused_total{reason="lake_unavailable",route="collect"}'
    assert m[key] >= 20
    assert m["http_requests_rejected_queue_full_total"] == 0  # not a full queue
    time.sleep(2)
    away.rename(dlq)  # and back
    until(lambda: p.metrics()["pipeline_accepting"] == 1, what="accepting again")
    after = load(p, connections=2, per=50)
    assert after.statuses == {200: 100}
    acked |= after.acked
    moto = MotoServer(port)  # the lake comes back
    moto.start()
    try:
        moto.client().create_bucket(Bucket="estat-outage")
        until(lambda: p.metrics()["dlq_files_current"] == 0, timeout=60, what="DLQ replayed")
        assert p.stop() == 0
        seen = ids_in(s3_objects(moto, "estat-outage"))
    finally:
        moto.stop()
    assert set(seen) == acked
    assert max(seen.values()) == 1
    assert "stage failed" not in p.log.read_text()


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    where = tmp_path / "dlq-fs"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24k", "tmpfs", str(where)], check=True)
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


def test_graceful_stop_with_a_full_dlq_exits_1_and_counts_the_loss_exactly(
    estat_factory: Any, small_tmpfs: Path
) -> None:
    port = free_port()  # the lake is down for the whole run
    p: EstatProcess = estat_factory(outage_env(port, DLQ_DIR=str(small_tmpfs)))
    p.start()
    acked: set[str] = set()
    statuses: Counter[int] = Counter()
    for _ in range(40):
        r = load(p, connections=2, per=50)
        acked |= r.acked
        statuses.update(r.statuses)
        if p.metrics().get("pipeline_accepting") == 0:
            break
        time.sleep(0.3)
    until(lambda: p.metrics()["pipeline_accepting"] == 0, what="the DLQ filled up")
    late = load(p, connections=1, per=10)
    assert late.statuses == {503: 10}
    rc = p.stop()
    assert rc == 1
    saved = dlq_ids(small_tmpfs)
    assert max(saved.values()) == 1
    lost = acked - set(saved)
    assert lost  # the test made a loss happen for real
    log = p.log.read_text()
    assert f'"unsavedEvents":{len(lost)}' in log
    assert "exiting with an error" in log


def test_hanging_lake_spills_early_and_never_refuses(estat_factory: Any) -> None:
    """One upload slot, a lake that never answers: without the circuit each
    batch would hold the slot for its whole retry budget and clients would
    get 503 within seconds; with it, batches go straight to the DLQ."""
    import socket

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(512)
        env = outage_env(
            silent.getsockname()[1],
            S3_APP_RETRIES="2",
            BATCH_SIZE="200",
            CHANNEL_SIZE="1000",
            UPLOAD_QUEUE="1",
            UPLOAD_CONCURRENCY="1",
            LAKE_STARTUP_CHECK="warn",
        )
        p: EstatProcess = estat_factory(env)
        p.start()
        res: LoadResult = asyncio.run(
            run_load("127.0.0.1", p.port, connections=4, per_connection=900, rate=300)
        )
        assert res.statuses == {200: 3600}
        assert p.stop() == 0
    saved = dlq_ids(Path(p.env["DATA_DIR"]) / "dlq")
    assert set(saved) == res.acked
    assert max(saved.values()) == 1
    assert "lake marked failing" in p.log.read_text()


def test_a_burst_of_emfile_heals(estat_factory: Any) -> None:
    """Descriptors run out while the lake is down: spills fail with EMFILE,
    ingest refuses; when descriptors are back the DLQ takes the batches,
    and when the lake is back everything acknowledged reaches it."""
    import resource

    port = free_port()
    p: EstatProcess = estat_factory(outage_env(port))
    p.start()
    assert p.proc is not None
    pid = p.proc.pid
    acked: set[str] = set()

    async def over_one_connection() -> tuple[LoadResult, LoadResult]:
        # the connection is opened before descriptors run out
        reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
        before, during = LoadResult(), LoadResult()
        tag = os.urandom(4).hex()

        async def send(i: int, into: LoadResult) -> None:
            await post_collect(reader, writer, f"emfile-{tag}-{i}", into, pad=b"")

        for i in range(50):
            await send(i, before)
        soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        in_use = len(os.listdir(f"/proc/{pid}/fd"))
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (in_use, hard))  # nothing left
        try:
            for i in range(50, 400):
                await send(i, during)
                if during.statuses.get(503):
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(1)
        finally:
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
        writer.close()
        return before, during

    before, during = asyncio.run(over_one_connection())
    acked |= before.acked | during.acked
    assert during.statuses.get(503), during.statuses  # it refused instead of piling up
    until(lambda: p.metrics()["pipeline_accepting"] == 1, what="accepting again")
    after = load(p, connections=2, per=25)
    assert after.statuses == {200: 50}
    acked |= after.acked
    moto = MotoServer(port)
    moto.start()
    try:
        moto.client().create_bucket(Bucket="estat-outage")
        until(lambda: p.metrics()["dlq_files_current"] == 0, timeout=60, what="DLQ replayed")
        assert p.stop() == 0
        objects = s3_objects(moto, "estat-outage")
    finally:
        moto.stop()
    seen: Counter[str] = Counter()
    for data in objects.values():
        for rec in decode(data):
            seen[json.loads(rec["body"])["id"]] += 1
    assert set(seen) == acked
    assert max(seen.values()) == 1
    assert "stage failed" not in p.log.read_text()
