"""``estat doctor``'s backlog rows, from a real metrics exposition: a relay
or a dispatcher falling behind is graded by the age of the oldest row due,
with the runbook section to read."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from estat.doctor import checks, parse
from estat.ops.metrics import Metrics


def rows(relay_age: float, dispatch_age: float) -> dict[str, tuple[str, str, str]]:
    m = Metrics(CollectorRegistry())
    m.source_outbox_oldest_due.set(relay_age)
    m.dispatch_outbox_rows.labels("PENDING", "POSTHOG").set(40)
    m.dispatch_oldest_due.labels("POSTHOG").set(dispatch_age)
    samples = parse(generate_latest(m.registry).decode())
    return {
        c.name: (c.status, c.value, c.runbook)
        for c in checks(samples, samples, 1.0, {"ready": True})
    }


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
