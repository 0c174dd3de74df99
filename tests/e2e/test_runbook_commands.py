"""Every ``estat …`` command the runbook shows, run against a live estat
(PostgreSQL, the in-process bus, PostHog = a capture server, a token with
every scope): each parses and answers (exit 0; ``estat doctor`` says OK,
WARN or CRIT but answers), so an operator can copy them as written."""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.capture import CaptureServer
from tests.conftest import EstatProcess
from tests.e2e.test_pipeline_e2e import client_batch, post, wait_for
from tests.servers import libpq, pg_bin

pytestmark = pytest.mark.e2e

RUNBOOK = Path(__file__).resolve().parents[2] / "docs" / "runbook.md"
TOKEN = "estat_rb_" + uuid.uuid4().hex
ENTRY = f"ops:read+replay+operate:{hashlib.sha256(TOKEN.encode()).hexdigest()}"
#: run until stopped (tested elsewhere), or not commands (a log line's text)
NOT_RUN = {"estat serve", "estat store", "estat relay", "estat dispatch", "estat started",
           "estat admin"}  # fmt: skip


def runbook_commands() -> list[str]:
    text = RUNBOOK.read_text()
    found = re.findall(r"`(estat\s[^`]+)`", text)
    in_blocks = False
    for line in text.splitlines():
        if line.startswith("```"):
            in_blocks = not in_blocks
        elif in_blocks and line.startswith("estat "):
            found.append(line)
    out = []
    for cmd in found:
        cmd = " ".join(cmd.split(" #")[0].split(" | ")[0].split())
        if cmd not in NOT_RUN and cmd not in out:
            out.append(cmd)
    return out


def concrete(cmd: str, admin_url: str, event_id: str, dump: Path) -> list[str]:
    cmd = re.sub(r"\[([^\]]*)\]", r"\1", cmd)  # optional parts, as written
    cmd = cmd.replace("<eventId>", event_id).replace(" NAME", " retention")
    cmd = cmd.replace("--limit N", "--limit 5").replace("http://estat-host:8081", admin_url)
    cmd = cmd.replace("estat-2026-12-01.dump", str(dump)).replace("--interval 30", "--interval 1")
    cmd = cmd.replace("<last night's dump>", str(dump)).replace("<revision>:", "0005:")
    week_ago = (datetime.now(UTC) - timedelta(days=7)).strftime("%Y-%m-%dT%H:%M:%SZ")
    cmd = cmd.replace("<7 days ago>", week_ago)
    now = datetime.now(UTC)
    for name, t in (("<start>", now - timedelta(hours=1)), ("<end>", now + timedelta(hours=1))):
        cmd = cmd.replace(name, t.strftime("%Y-%m-%dT%H:%M:%SZ"))
    if cmd.startswith("estat doctor") and "--interval" not in cmd:
        cmd += " --interval 1"  # the two reads of /metrics, 1 s apart rather than 10
    return shlex.split(cmd)


def test_every_estat_command_of_the_runbook_runs(
    estat_factory: Any, capture: CaptureServer, pg_url: str, tmp_path: Path
) -> None:
    commands = runbook_commands()
    assert len(commands) >= 25  # the runbook's commands were found
    env = {
        "ADMIN_TOKENS": ENTRY,
        "DATABASE_URL": pg_url,
        "POSTHOG_HOST": capture.url,
        "POSTHOG_API_KEY": "phc_test",
        "MQ_TRACE": "all",
    }
    p: EstatProcess = estat_factory(env)
    p.start()
    ids = [uuid.uuid4().hex for _ in range(5)]
    assert post(p.url + "/api/v1/analytics/events", client_batch(ids))[0] == 200
    wait_for(lambda: len(capture.uuids()) == 5)
    dump = tmp_path / "estat.dump"
    subprocess.run([pg_bin("pg_dump"), "-Fc", "-f", str(dump), libpq(pg_url)], check=True)
    cli_env = {
        **p.env,
        "ESTAT_ADMIN_URL": p.admin_url,
        "ESTAT_ADMIN_TOKEN": TOKEN,
        "PATH": f"{Path(pg_bin('pg_dump')).parent}:{os.environ['PATH']}",
    }

    def attempt(cmd: str) -> str | None:
        argv = concrete(cmd, p.admin_url, ids[0], dump)
        run = subprocess.run(
            [sys.executable, "-m", "estat", *argv[1:]], env=cli_env, cwd=p.workdir,
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        out = run.stdout + run.stderr
        ok = (
            run.returncode in (0, 1, 2) and "ready" in out
            if argv[1] == "doctor"
            else (run.returncode == 0)
        )
        return None if ok and "usage:" not in out else f"{cmd!r} -> {run.returncode}: {out[-400:]}"

    # independent commands (each answers whatever the others did), two at a
    # time: the doctor's waits and the server's answers overlap the others
    with ThreadPoolExecutor(2) as pool:
        failures = [f for f in pool.map(attempt, commands) if f is not None]
    assert failures == []
    assert p.stop() == 0
