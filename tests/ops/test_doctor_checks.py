"""``estat doctor``'s rows, from a real metrics exposition: a relay or a
dispatcher falling behind is graded by the age of the oldest row due, with
the runbook section to read; a healthy destination's circuit and a batch
still within its flush interval are not warnings."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest

from estat.doctor import checks, parse
from estat.ops.metrics import Metrics


def graded(m: Metrics, ready: dict[str, Any]) -> dict[str, tuple[str, str, str]]:
    samples = parse(generate_latest(m.registry).decode())
    return {c.name: (c.status, c.value, c.runbook) for c in checks(samples, samples, 1.0, ready)}


def rows(relay_age: float, dispatch_age: float) -> dict[str, tuple[str, str, str]]:
    m = Metrics(CollectorRegistry())
    m.source_outbox_oldest_due.set(relay_age)
    m.dispatch_outbox_rows.labels("PENDING", "POSTHOG").set(40)
    m.dispatch_oldest_due.labels("POSTHOG").set(dispatch_age)
    return graded(m, {"ready": True})


def test_a_relay_and_a_dispatcher_keeping_up_are_ok() -> None:
    got = rows(0, 2)
    assert got["relay behind"][0] == "OK"
    assert got["dispatch POSTHOG behind"][:2] == ("OK", "oldest due row 2 s old")


def test_a_relay_ten_minutes_behind_is_critical_and_a_dispatcher_twenty_a_warning() -> None:
    got = rows(700, 1200)
    assert got["relay behind"] == (
        "CRIT", "oldest due row 700 s old", "docs/runbook.md#estatrelaybehind",
    )  # fmt: skip
    assert got["dispatch POSTHOG behind"] == (
        "WARN", "oldest due row 1200 s old", "docs/runbook.md#estatdispatchbehind",
    )  # fmt: skip
    assert rows(400, 4000)["relay behind"][0] == "WARN"
    assert rows(400, 4000)["dispatch POSTHOG behind"][0] == "CRIT"


def test_a_closed_destination_circuit_is_ready_and_an_open_one_is_named() -> None:
    m = Metrics(CollectorRegistry())
    ready = {"ready": True, "database": "ok", "destinations": {"POSTHOG": "closed"}}
    assert graded(m, ready)["ready"][:2] == ("OK", "ready")
    ready["destinations"] = {"POSTHOG": "closed", "WEBHOOK": "open"}
    assert graded(m, ready)["ready"][:2] == ("WARN", "ready: WEBHOOK=open")


def test_no_upload_yet_is_a_warning_only_once_the_process_is_up_ten_minutes() -> None:
    def last_upload(up: float) -> tuple[str, str]:
        m = Metrics(CollectorRegistry())
        m.http_accepted.inc(3)
        m.process_start_time.set(time.time() - up)
        status, value, _ = graded(m, {"ready": True})["last lake upload"]
        return status, value.split(" (")[0]

    assert last_upload(30) == ("OK", "none since start")
    assert last_upload(900) == ("WARN", "none since start")
    assert last_upload(3600) == ("CRIT", "none since start")


def test_a_bus_that_lost_its_data_is_critical_with_the_backfill_to_run() -> None:
    m = Metrics(CollectorRegistry())
    m.bus_lost.labels("redis-stream")  # declared at start: 0
    assert graded(m, {"ready": True})["bus data lost"][:2] == ("OK", "0 since start")
    m.bus_lost.labels("redis-stream").inc()
    assert graded(m, {"ready": True})["bus data lost"] == (
        "CRIT", "1 since start", "docs/runbook.md#estatbuslostdata",
    )  # fmt: skip
