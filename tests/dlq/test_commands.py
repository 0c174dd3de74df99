"""``estat dlq stats | ls | replay | purge`` as an operator runs them."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

from estat.clock import SystemClock
from estat.codec import decode
from tests.dlq.test_dlq import ERR, batch, make


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
