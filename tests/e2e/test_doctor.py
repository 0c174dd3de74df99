"""``estat doctor`` against real ``estat serve`` processes: a healthy one
with a destination, found through the server's ``ADMIN_ADDR`` in ``.env``
(exit 0, every check OK, the last lake upload seconds ago), one losing
events (a lake nobody answers, a DLQ too small: exit 2, the loss and the
upload errors CRIT with their runbook sections), one paused worker (exit 1),
and no listener at all (exit 2)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import EstatProcess, free_port, losing_lake_env

pytestmark = pytest.mark.e2e

TOKEN = "estat_doc_" + uuid.uuid4().hex
ENTRY = f"ops:read+operate:{hashlib.sha256(TOKEN.encode()).hexdigest()}"


def doctor(url: str | None, *args: str, cwd: Path | None = None) -> tuple[int, dict[str, Any]]:
    """``estat doctor``; without ``url``, it finds the listener itself
    (``ADMIN_ADDR`` in ``cwd``'s ``.env``)."""
    env = {k: v for k, v in os.environ.items() if k not in ("ESTAT_ADMIN_URL", "ADMIN_ADDR")}
    run = subprocess.run(
        [sys.executable, "-m", "estat", "doctor", *(["--url", url] if url else []),
         "--interval", "1", "--json", *args],
        capture_output=True, text=True, timeout=60, cwd=cwd, env=env,
    )  # fmt: skip
    body = json.loads(run.stdout) if run.stdout.strip() else {}
    return run.returncode, body


def collect(p: EstatProcess, n: int) -> None:
    for _ in range(n):
        req = urllib.request.Request(p.url + "/collect", data=b'{"e":"x"}', method="POST")
        with urllib.request.urlopen(req, timeout=5) as r:
            assert r.status == 200


def until_metric(p: EstatProcess, name: str, value: float, timeout: float = 30) -> None:
    import time

    deadline = time.monotonic() + timeout
    while p.metrics().get(name, 0) < value:
        assert time.monotonic() < deadline, f"{name} never reached {value}"
        time.sleep(0.1)


def by_name(body: dict[str, Any]) -> dict[str, dict[str, str]]:
    return {c["name"]: c for c in body["checks"]}


def test_a_healthy_estat_is_ok(estat_factory: Any, capture: Any, tmp_path: Path) -> None:
    p: EstatProcess = estat_factory(
        {"FLUSH_INTERVAL": "200ms", "ADMIN_TOKENS": ENTRY, "POSTHOG_HOST": capture.url,
         "POSTHOG_API_KEY": capture.api_key}
    )  # fmt: skip
    p.start()
    collect(p, 5)
    until_metric(p, "s3_events_stored_total", 5)
    # no --url: the server's ADMIN_ADDR, from .env, a wildcard host meaning loopback
    (tmp_path / ".env").write_text(f"ADMIN_ADDR=:{p.admin_url.rsplit(':', 1)[1]}\n")
    rc, body = doctor(None, cwd=tmp_path)
    assert rc == 0, body
    assert body["status"] == "OK"
    checks = by_name(body)
    assert {c["status"] for c in checks.values()} == {"OK"}
    assert checks["last lake upload"]["value"].endswith("s ago")
    assert checks["events lost"]["value"] == "0 since start"
    assert checks["circuit POSTHOG"]["value"] == "closed"  # a destination, healthy
    # a paused worker is a WARN: exit 1
    req = urllib.request.Request(
        p.admin_url + "/api/v1/admin/workers/dlq-replayer/pause", method="POST",
        headers={"Authorization": f"Bearer {TOKEN}"},
    )  # fmt: skip
    urllib.request.urlopen(req, timeout=5).close()
    until_metric(p, 'worker_paused{worker="dlq-replayer"}', 1, timeout=10)
    rc, body = doctor(p.admin_url)
    assert rc == 1
    assert by_name(body)["paused workers"] == {
        "name": "paused workers", "status": "WARN", "value": "dlq-replayer",
        "threshold": "WARN any (its backlog grows)", "runbook": "docs/admin.md#pausing-a-worker",
    }  # fmt: skip
    assert p.stop() == 0


def test_an_estat_losing_events_is_critical(estat_factory: Any) -> None:
    p: EstatProcess = estat_factory(losing_lake_env())
    p.start()
    collect(p, 10)
    until_metric(p, "dlq_events_dropped_total", 10)
    rc, body = doctor(p.admin_url)
    assert rc == 2
    assert body["status"] == "CRIT"
    checks = by_name(body)
    assert checks["events lost"]["status"] == "CRIT"
    assert checks["events lost"]["value"] == "10 since start"
    assert checks["events lost"]["runbook"] == "docs/runbook.md#estatdlqeventsdropped"
    p.kill()


def test_no_listener_is_critical(tmp_path: Path) -> None:
    rc, body = doctor(f"http://127.0.0.1:{free_port()}")
    assert rc == 2
    assert body == {}
