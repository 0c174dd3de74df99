"""Crash points: the process is SIGKILLed between each pair of steps of a DLQ
write or replay (``ESTAT_CRASH_AT``); a restart recovers with nothing that was
committed to the DLQ lost, and at worst one key uploaded twice (same bytes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import EstatProcess, MotoServer, free_port
from tests.e2e.test_serve import ids_in, load, s3_objects, wait_metric

pytestmark = pytest.mark.e2e


def env_for(port: int) -> dict[str, str]:
    return {
        "RAW_BUCKET": "estat-crash",
        "S3_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "S3_TIMEOUT": "1s",
        "S3_APP_RETRIES": "0",
        "BATCH_SIZE": "50",
        "SHUTDOWN_TIMEOUT": "4s",
    }


def recover_and_collect(
    estat_factory: Any, env: dict[str, str], moto: MotoServer
) -> tuple[dict[str, bytes], dict[str, float]]:
    p: EstatProcess = estat_factory(env)
    p.start()
    m = wait_metric(p, "dlq_files_current", 0, timeout=30)
    assert p.stop() == 0
    return s3_objects(moto, "estat-crash"), m


def lake_up(port: int) -> MotoServer:
    moto = MotoServer(port)
    moto.start()
    moto.client().create_bucket(Bucket="estat-crash")
    return moto


@pytest.mark.parametrize("point", ["dlq.after_temp_write", "dlq.after_rename"])
def test_crash_while_spilling(estat_factory: Any, tmp_path: Path, point: str) -> None:
    port = free_port()
    env = env_for(port)
    # first, a committed DLQ file from a clean run
    p: EstatProcess = estat_factory(env)
    p.start()
    committed = load(p, connections=1, per=50).acked
    assert p.stop() == 0
    # then a crash in the middle of the next spill
    crashing: EstatProcess = estat_factory({**env, "ESTAT_CRASH_AT": point})
    crashing.start()
    in_flight = load(crashing, connections=1, per=50).acked
    assert crashing.proc is not None
    assert crashing.proc.wait(30) == -9
    moto = lake_up(port)
    try:
        objects, m = recover_and_collect(estat_factory, env, moto)
    finally:
        moto.stop()
    seen = ids_in(objects)
    assert committed <= set(seen)  # nothing committed to the DLQ is lost
    assert max(seen.values()) == 1
    assert m["dlq_files_quarantined_total"] == 0  # a torn write never counts as a file
    if point == "dlq.after_rename":
        assert in_flight <= set(seen)  # committed at the rename
    leftovers = [
        f.name
        for f in (tmp_path / "data" / "dlq").rglob("*")
        if f.is_file() and f.name != ".estat.lock"
    ]
    assert leftovers == []


@pytest.mark.parametrize("point", ["replay.after_upload", "replay.after_delete_data"])
def test_crash_while_replaying(estat_factory: Any, tmp_path: Path, point: str) -> None:
    port = free_port()
    env = env_for(port)
    p: EstatProcess = estat_factory(env)
    p.start()
    acked = load(p, connections=2, per=50).acked
    assert p.stop() == 0
    assert len(list((tmp_path / "data" / "dlq").glob("*/*.dlq"))) == 2
    moto = lake_up(port)
    try:
        crashing: EstatProcess = estat_factory({**env, "ESTAT_CRASH_AT": point})
        crashing.start(wait=False)
        assert crashing.proc is not None
        assert crashing.proc.wait(60) == -9
        objects, _ = recover_and_collect(estat_factory, env, moto)
    finally:
        moto.stop()
    seen = ids_in(objects)
    assert set(seen) == acked
    assert max(seen.values()) == 1
    assert len(objects) == 2  # a re-upload wrote the same key again
    assert [
        f.name
        for f in (tmp_path / "data" / "dlq").rglob("*")
        if f.is_file() and f.name != ".estat.lock"
    ] == []
