"""``estat dlq stats | ls | replay | purge`` as an operator runs them."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from estat.clock import SystemClock
from estat.codec import decode
from tests.dlq.test_dlq import ERR, batch, make

pytestmark = pytest.mark.e2e


def estat(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATA_DIR": str(tmp_path / "data"), "LOG_LEVEL": "warning"}
    env.pop("RAW_BUCKET", None)
    return subprocess.run(
        [sys.executable, "-m", "estat", "dlq", *args],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )


def fill(tmp_path: Path, n: int) -> None:
    async def go() -> None:
        dlq, _ = make(tmp_path / "data" / "dlq", SystemClock())  # type: ignore[arg-type]
        for i in range(n):
            await dlq.spill(
                batch(f"raw/dt=2026-01-01/hr=00/{i}_x_000000.jsonl.gz", range(i * 10, i * 10 + 10)),
                ERR,
                3,
            )

    asyncio.run(go())


def test_stats_ls_replay_purge(tmp_path: Path) -> None:
    fill(tmp_path, 3)
    out = estat(tmp_path, "stats")
    assert out.returncode == 0, out.stderr
    assert "files   3" in out.stdout, out.stdout + out.stderr
    assert "events  30" in out.stdout
    out = estat(tmp_path, "ls")
    assert out.stdout.count(".dlq") == 3, out.stdout + out.stderr
    out = estat(tmp_path, "replay", "--dry-run")
    assert "3 files would be replayed" in out.stdout, out.stdout + out.stderr
    assert len(list((tmp_path / "data" / "dlq").glob("*/*.dlq"))) == 3
    out = estat(tmp_path, "replay", "--limit", "2")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "replayed 2 files" in out.stdout, out.stdout + out.stderr
    lake = sorted((tmp_path / "data" / "lake").rglob("*.jsonl.gz"))
    assert [p.name for p in lake] == ["0_x_000000.jsonl.gz", "1_x_000000.jsonl.gz"]
    assert [r["id"] for r in decode(lake[0].read_bytes())] == list(range(10))
    assert estat(tmp_path, "purge", "--older-than", "0s").returncode == 2  # needs --yes
    out = estat(tmp_path, "purge", "--older-than", "0s", "--yes")
    assert "purged 1 files (10 events)" in out.stdout, out.stdout + out.stderr
    out = estat(tmp_path, "stats")
    assert "files   0" in out.stdout, out.stdout + out.stderr


def fill_bound_for(tmp_path: Path, destination: str, n: int = 2) -> None:
    async def go() -> None:
        dlq, _ = make(tmp_path / "data" / "dlq", SystemClock(), destination=destination)  # type: ignore[arg-type]
        for i in range(n):
            await dlq.spill(
                batch(f"raw/dt=2026-01-01/hr=00/{i}_y_000000.jsonl.gz", range(i, i + 1)), ERR, 3
            )

    asyncio.run(go())


def test_replay_refuses_a_file_bound_for_another_lake(tmp_path: Path) -> None:
    fill_bound_for(tmp_path, "http://127.0.0.1:9/estat-prod")  # the service's S3 lake
    here = f"file://{(tmp_path / 'data' / 'lake').resolve()}"
    out = estat(tmp_path, "replay", "--dry-run")
    assert out.returncode == 0
    assert "bound for http://127.0.0.1:9/estat-prod" in out.stdout, out.stdout
    assert f"→ {here}" in out.stdout
    assert "refused" in out.stdout
    out = estat(tmp_path, "replay")
    assert out.returncode == 1
    errors = [line for line in out.stderr.splitlines() if line.startswith("estat:")]
    assert len(errors) == 1, out.stderr
    assert "bound for http://127.0.0.1:9/estat-prod" in errors[0]
    assert "--to-current-lake" in errors[0]
    assert not (tmp_path / "data" / "lake").exists() or not any(
        (tmp_path / "data" / "lake").rglob("*.jsonl.gz")
    )
    assert len(list((tmp_path / "data" / "dlq").glob("*/*.dlq"))) == 2  # kept
    out = estat(tmp_path, "replay", "--to-current-lake")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "replayed 2 files" in out.stdout
    assert len(list((tmp_path / "data" / "lake").rglob("*.jsonl.gz"))) == 2


def test_read_only_commands_create_nothing(tmp_path: Path) -> None:
    for args in (("stats",), ("ls",), ("replay", "--dry-run")):
        out = estat(tmp_path, *args)
        assert out.returncode == 1, args
        assert "does not exist" in out.stderr
        assert out.stderr.count("\n") == 1  # one line, no traceback
    assert not (tmp_path / "data").exists()


def test_purge_with_a_bad_duration_is_one_line(tmp_path: Path) -> None:
    fill(tmp_path, 1)
    out = estat(tmp_path, "purge", "--older-than", "5x", "--yes")
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert out.stderr.startswith("estat: --older-than")


def test_a_replay_from_the_command_line_counts_in_the_completeness_ledger(
    tmp_path: Path, estat_factory: Any, moto: Any, bucket: str
) -> None:
    """A lake down while estat served: the batches wait in the DLQ and the
    ledger says accepted 5, lake 0. An operator's `estat dlq replay` puts
    them in the lake; without counting them there, their hour kept its gap
    (EstatCompletenessGap, doctor CRIT) and never got its manifest."""
    import sqlite3
    import urllib.request

    from tests.conftest import losing_lake_env

    env = {**losing_lake_env(), "RAW_BUCKET": bucket, "DLQ_MAX_SIZE_BYTES": "10000000"}
    p = estat_factory(env)
    p.start()
    for i in range(5):
        req = urllib.request.Request(p.url + "/collect", data=b'{"event":"e%d"}' % i)
        assert urllib.request.urlopen(req, timeout=5).status == 200
    dlq = tmp_path / "data" / "dlq"
    deadline = time.monotonic() + 30
    while sum(int(f.name.split("-")[1]) for f in dlq.glob("*/*.dlq")) < 5:
        assert time.monotonic() < deadline, "the batches never reached the DLQ"
        time.sleep(0.1)
    assert p.stop() == 0
    db = tmp_path / "data" / "estat.db"

    def ledger() -> dict[str, int]:
        with sqlite3.connect(db) as conn:
            return dict(
                conn.execute(
                    "SELECT stage, sum(events) FROM estat_ledger WHERE dataset = 'raw' GROUP BY 1"
                ).fetchall()
            )

    assert ledger() == {"accepted": 5}
    fixed = {**p.env, "S3_ENDPOINT_URL": moto.endpoint}  # the lake is back
    out = subprocess.run(
        [sys.executable, "-m", "estat", "dlq", "replay", "--to-current-lake"],
        env=fixed, cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "completeness ledger was not updated" not in out.stderr
    assert ledger() == {"accepted": 5, "lake": 5}  # the hour is complete once it closes
    with sqlite3.connect(db) as conn:
        listed = conn.execute("SELECT sum(events) FROM estat_lake_objects").fetchone()
    assert listed == (5,)  # for the hour's manifest
