"""``estat serve`` as a real process: load, SIGTERM, and every acknowledged
event exactly once in the lake (local directory and S3)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from estat.codec import decode
from tests.conftest import EstatProcess, MotoServer, free_port
from tests.e2e.load import run_load

pytestmark = pytest.mark.e2e

KEY = re.compile(r"^raw/dt=\d{4}-\d{2}-\d{2}/hr=\d{2}/\d{10}_[A-Za-z0-9.-]+_\d{6}\.jsonl\.gz$")


def local_objects(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def s3_objects(moto: MotoServer, bucket: str) -> dict[str, bytes]:
    c = moto.client()
    out = {}
    for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            out[obj["Key"]] = c.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
    return out


def ids_in(objects: dict[str, bytes]) -> Counter[str]:
    seen: Counter[str] = Counter()
    for key, data in objects.items():
        assert KEY.match(key), key
        for rec in decode(data):
            import json

            seen[json.loads(rec["body"])["id"]] += 1
            assert rec["ip"] == "81.2.69.160"
            assert rec["user_agent"] == "load/1"
    return seen


def wait_metric(p: EstatProcess, name: str, value: float, timeout: float = 10) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    m: dict[str, float] = {}
    while time.monotonic() < deadline:
        m = p.metrics()
        if m.get(name) == value:
            return m
        time.sleep(0.2)
    raise AssertionError(f"{name}={m.get(name)} != {value}")


def load(p: EstatProcess, connections: int, per: int) -> Any:
    return asyncio.run(run_load("127.0.0.1", p.port, connections=connections, per_connection=per))


def test_local_lake_every_acked_event_exactly_once(estat_factory: Any, tmp_path: Path) -> None:
    p: EstatProcess = estat_factory({"BATCH_SIZE": "3000", "FLUSH_INTERVAL": "1h"})
    p.start()
    res = load(p, connections=32, per=625)
    assert res.statuses.get(500, 0) == 0
    assert len(res.acked) >= 15_000
    m = wait_metric(p, "http_requests_accepted_total", len(res.acked))
    assert m["http_requests_total"] >= len(res.acked)
    assert m["http_requests_rejected_queue_full_total"] == res.statuses.get(503, 0)
    assert p.stop() == 0  # SIGTERM: the open batches are flushed
    seen = ids_in(local_objects(tmp_path / "data" / "lake"))
    assert set(seen) == res.acked
    assert max(seen.values()) == 1
    assert "shutdown complete" in p.log.read_text()


def test_s3_lake_every_acked_event_exactly_once(
    estat_factory: Any, moto: MotoServer, bucket: str
) -> None:
    p: EstatProcess = estat_factory(
        {"RAW_BUCKET": bucket, "S3_ENDPOINT_URL": moto.endpoint, "BATCH_SIZE": "2500"}
    )
    p.start()
    res = load(p, connections=16, per=500)
    assert len(res.acked) >= 7_000
    wait_metric(p, "http_requests_accepted_total", len(res.acked))
    assert p.stop() == 0
    objects = s3_objects(moto, bucket)
    seen = ids_in(objects)
    assert set(seen) == res.acked
    assert max(seen.values()) == 1
    head = moto.client().head_object(Bucket=bucket, Key=next(iter(objects)))
    assert head["ContentEncoding"] == "gzip"


def test_workers_act_as_one_server(estat_factory: Any, tmp_path: Path) -> None:
    p: EstatProcess = estat_factory({"FLUSH_INTERVAL": "1h"}, workers=2)
    p.start()
    res = load(p, connections=32, per=300)
    total = len(res.acked)
    assert total >= 8_000
    # the admin listener (one per server) answers /metrics for every worker
    for _ in range(4):
        wait_metric(p, "http_requests_accepted_total", total)
    assert p.stop() == 0  # SIGTERM to the parent drains every worker
    objects = local_objects(tmp_path / "data" / "lake")
    seen = ids_in(objects)
    assert set(seen) == res.acked
    assert max(seen.values()) == 1
    instances = {k.split("/")[-1].split("_")[1] for k in objects}
    assert {i.rsplit("-", 1)[-1] for i in instances} == {"w0", "w1"}


def dlq_files(root: Path) -> list[Path]:
    return sorted(root.glob("*/*.dlq"))


def test_drain_with_lake_down_spills_then_restart_delivers(
    estat_factory: Any, tmp_path: Path
) -> None:
    port = free_port()
    env = {
        "RAW_BUCKET": "estat-outage",
        "S3_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "SHUTDOWN_TIMEOUT": "4s",
        "S3_TIMEOUT": "1s",
        "BATCH_SIZE": "50",
    }
    p: EstatProcess = estat_factory(env)
    p.start()
    res = load(p, connections=4, per=50)
    assert len(res.acked) == 200
    t0 = time.monotonic()
    assert p.stop() == 0
    assert time.monotonic() - t0 < 4 + 3
    log = p.log.read_text()
    assert "not stored" not in log
    assert '"unsavedEvents":0' in log
    assert dlq_files(tmp_path / "data" / "dlq")

    moto = MotoServer(port)
    moto.start()
    try:
        moto.client().create_bucket(Bucket="estat-outage")
        again: EstatProcess = estat_factory(env)
        again.start()
        wait_metric(again, "dlq_files_current", 0, timeout=30)
        assert again.stop() == 0
        objects = s3_objects(moto, "estat-outage")
    finally:
        moto.stop()
    seen = ids_in(objects)
    assert set(seen) == res.acked
    assert max(seen.values()) == 1
    assert dlq_files(tmp_path / "data" / "dlq") == []


def test_s3_outage_spills_then_replays_when_the_endpoint_appears(
    estat_factory: Any, tmp_path: Path
) -> None:
    port = free_port()
    p: EstatProcess = estat_factory(
        {
            "RAW_BUCKET": "estat-late",
            "S3_ENDPOINT_URL": f"http://127.0.0.1:{port}",
            "S3_TIMEOUT": "1s",
            "BATCH_SIZE": "100",
            "FLUSH_INTERVAL": "1s",
        }
    )
    p.start()
    res = load(p, connections=8, per=100)
    assert len(res.acked) == 800
    m = wait_metric(p, "dlq_events_enqueued_total", 800, timeout=30)
    assert m["dlq_files_current"] >= 8
    moto = MotoServer(port)
    moto.start()
    try:
        moto.client().create_bucket(Bucket="estat-late")
        m = wait_metric(p, "dlq_files_current", 0, timeout=40)
        assert m["dlq_events_reuploaded_total"] == 800
        assert m["dlq_events_dropped_total"] == 0
        assert p.stop() == 0
        objects = s3_objects(moto, "estat-late")
    finally:
        moto.stop()
    seen = ids_in(objects)
    assert set(seen) == res.acked
    assert max(seen.values()) == 1  # no batch stored as two different objects
    assert "DLQ → RAW success" in p.log.read_text()


def test_bad_configuration_fails_fast_with_one_line(estat_factory: Any) -> None:
    p: EstatProcess = estat_factory({"FLUSH_INTERVAL": "often"})
    p.start(wait=False)
    assert p.proc is not None
    assert p.proc.wait(30) == 2
    p._logf.close()
    out = p.log.read_text().strip().splitlines()
    assert out == [
        "estat: invalid configuration: FLUSH_INTERVAL='often': expected a duration such as 500ms, 3s, 2m or 24h (accepts a duration)"
    ]


def test_crashed_worker_is_restarted_and_counters_survive(estat_factory: Any) -> None:
    import json
    import os
    import signal

    p: EstatProcess = estat_factory({"FLUSH_INTERVAL": "1s"}, workers=2)
    p.start()
    first = load(p, connections=8, per=100)
    wait_metric(p, "http_requests_accepted_total", len(first.acked))
    started = [
        json.loads(line)
        for line in p.log.read_text().splitlines()
        if line.startswith("{") and '"worker started"' in line
    ]
    victim = started[0]["pid"]
    os.kill(victim, signal.SIGKILL)
    p.wait_log("worker exited unexpectedly")
    p.wait_log("estat started", count=3)
    second = load(p, connections=8, per=100)
    total = len(first.acked) + len(second.acked)
    # the dead worker's counts are kept: totals never go backwards
    wait_metric(p, "http_requests_accepted_total", total)
    assert p.stop() == 0


def test_sigterm_to_every_process_still_drains(estat_factory: Any, tmp_path: Path) -> None:
    """systemd and `docker stop` signal the whole process group, workers included."""
    import os
    import signal

    p: EstatProcess = estat_factory({"FLUSH_INTERVAL": "1h"}, workers=2)
    p.start()
    res = load(p, connections=8, per=100)
    assert p.proc is not None
    pids = [int(json_line["pid"]) for json_line in _worker_lines(p)]
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    p.proc.send_signal(signal.SIGTERM)
    for pid in pids:  # and once more while they drain
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    assert p.proc.wait(60) == 0
    seen = ids_in(local_objects(tmp_path / "data" / "lake"))
    assert set(seen) == res.acked


def _worker_lines(p: EstatProcess) -> list[dict[str, Any]]:
    import json

    return [
        json.loads(line)
        for line in p.log.read_text().splitlines()
        if line.startswith("{") and '"worker started"' in line
    ]


def test_a_lake_directory_that_cannot_be_made_is_a_clear_start_error(
    estat_factory: Any, tmp_path: Path
) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    p = estat_factory({"LAKE_DIR": str(blocked / "lake")})
    p.start(wait=False)
    assert p.proc is not None
    assert p.proc.wait(30) == 2
    log = p.log.read_text()
    assert "cannot be created: Not a directory" in log
    assert "Traceback" not in log
