"""``estat doctor``: the daily checklist (seed 000 §4, seed 003's morning
checks) as one command against a running estat's admin listener.

It reads ``/metrics`` twice, ``--interval`` apart (rates: DLQ growth,
queue-full rejections, upload errors), and the detailed ``/ready``; with a
``read`` token (``--token`` / ``ESTAT_ADMIN_TOKEN``) it also reads the
workers' pause state. Each check is OK, WARN or CRIT with its threshold and
the runbook section to read; ``--json`` prints the same as JSON. Exit
status: 0 all OK, 1 a WARN, 2 a CRIT (or the listener did not answer), so
cron or CI can run it.

Imports only the standard library at module level: ``estat serve`` builds
the command-line parser (this module's part too) before it holds SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

RUNBOOK = "docs/runbook.md#"
PERMANENT = ("access_denied", "no_such_bucket", "unauthenticated", "permission")
LEVELS = {"OK": 0, "WARN": 1, "CRIT": 2}

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    status: str  # OK, WARN, CRIT
    value: str
    threshold: str
    runbook: str


def add_doctor_parser(sub: Any) -> None:
    d = sub.add_parser(
        "doctor",
        help="is it healthy? the daily checks against a running estat (exit 0 / 1 / 2)",
        description=__doc__.split("\n\n")[1].replace("\n", " ") if __doc__ else None,
    )
    d.add_argument(
        "--url",
        default=None,
        help="admin listener (ESTAT_ADMIN_URL; default: ADMIN_ADDR from the environment or .env)",
    )
    d.add_argument("--token", default=None, help="a read token (ESTAT_ADMIN_TOKEN), optional")
    d.add_argument(
        "--interval", type=float, default=10.0, help="seconds between the two reads (rates)"
    )
    d.add_argument("--json", action="store_true", help="print the checks as JSON")


def parse(text: str) -> Samples:
    from prometheus_client.parser import text_string_to_metric_families

    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(samples: Samples, name: str, **match: str) -> float:
    return sum(
        v
        for (n, labels), v in samples.items()
        if n == name and all(dict(labels).get(k) == want for k, want in match.items())
    )


def by_label(samples: Samples, name: str, label: str, **match: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for (n, labels), v in samples.items():
        d = dict(labels)
        if n == name and all(d.get(k) == want for k, want in match.items()):
            out[d.get(label, "")] = out.get(d.get(label, ""), 0.0) + v
    return out


def grade(value: float, warn: float, crit: float) -> str:
    return "CRIT" if value > crit else "WARN" if value > warn else "OK"


def checks(before: Samples, after: Samples, seconds: float, ready: dict[str, Any]) -> list[Check]:
    def rate(name: str, **match: str) -> float:
        return max(0.0, total(after, name, **match) - total(before, name, **match)) / seconds

    out: list[Check] = []

    def add(name: str, status: str, value: str, threshold: str, anchor: str) -> None:
        out.append(
            Check(name, status, value, threshold, anchor if "/" in anchor else RUNBOOK + anchor)
        )

    ok = bool(ready.get("ready", False))
    bad = [
        f"{k}={v}"
        for k, v in ready.items()
        if k not in ("ready", "roles", "destinations")
        and not (v is True or v in ("ok", "off", "unchecked") or (k == "draining" and v is False))
    ]
    # each destination's circuit: ``closed`` is the healthy state
    bad += [f"{k}={v}" for k, v in (ready.get("destinations") or {}).items() if v != "closed"]
    add(
        "ready", "CRIT" if not ok else "WARN" if bad else "OK",
        ("ready" if ok else "not ready") + (": " + ", ".join(bad) if bad else ""),
        "/ready 200, every dependency ok", "estatrefusingevents",
    )  # fmt: skip
    files = total(after, "dlq_files_current")
    add("dlq files", grade(files, 100, 1000), f"{files:.0f}", "WARN > 100, CRIT > 1000",
        "estatdlqfileshigh")  # fmt: skip
    growth = (files - total(before, "dlq_files_current")) / seconds
    add("dlq growth", grade(growth, 1, 20), f"{growth:+.2f} files/s", "WARN > 1/s, CRIT > 20/s",
        "estatdlqgrowingfast")  # fmt: skip
    lost = total(after, "dlq_events_dropped_total") + total(after, "shutdown_events_unsaved_total")
    add("events lost", "CRIT" if lost else "OK", f"{lost:.0f} since start",
        "CRIT > 0 (dropped by the DLQ, unsaved at a stop)", "estatdlqeventsdropped")  # fmt: skip
    full = rate("http_requests_rejected_queue_full_total")
    requests = rate("http_responses_total") or 1.0
    add("queue-full 503s", "CRIT" if full / requests > 0.01 else "WARN" if full else "OK",
        f"{full:.2f}/s", "WARN > 0, CRIT > 1 % of requests", "estatqueuefullrejections")  # fmt: skip
    errors = rate("s3_put_errors_total")
    classes = {
        c: v
        for c, v in by_label(after, "s3_put_errors_by_class_total", "error_class").items()
        if v > by_label(before, "s3_put_errors_by_class_total", "error_class").get(c, 0.0)
    }
    permanent = [c for c in classes if c in PERMANENT]
    add("lake upload errors", "CRIT" if permanent or errors > 0.05 else "WARN" if errors else "OK",
        f"{errors:.2f}/s" + (f" ({', '.join(sorted(classes))})" if classes else ""),
        "WARN > 0, CRIT > 0.05/s or a permanent class", "estats3puterrors")  # fmt: skip
    circuit = total(after, "lake_circuit_state")
    add("lake circuit", "CRIT" if circuit == 1 else "WARN" if circuit == 2 else "OK",
        {0: "closed", 1: "open", 2: "half-open"}.get(int(circuit), str(circuit)),
        "CRIT open", "estatlakefailing")  # fmt: skip
    last = total(after, "lake_last_upload_timestamp_seconds")
    accepted = total(after, "http_requests_accepted_total") + total(
        after, "analytics_ingest_events_total", result="accepted"
    )
    if last:
        age = time.time() - last
        add("last lake upload", grade(age, 600, 1800) if accepted else "OK", f"{age:.0f} s ago",
            "WARN > 10 min, CRIT > 30 min while events are accepted", "estatlakestalled")  # fmt: skip
    elif accepted:
        # a batch waits up to FLUSH_INTERVAL for more events: none yet is
        # news only once the process has been up as long as the alert waits
        up = time.time() - (total(after, "process_start_time_seconds") or time.time())
        add("last lake upload", grade(up, 600, 1800), f"none since start ({up:.0f} s ago)",
            "WARN > 10 min, CRIT > 30 min while events are accepted", "estatlakestalled")  # fmt: skip
    size = total(after, "data_dir_disk_total_bytes")
    if size:
        used = 1 - total(after, "data_dir_disk_free_bytes") / size
        add("DATA_DIR disk", grade(used, 0.8, 0.9), f"{used:.0%} used", "WARN > 80 %, CRIT > 90 %",
            "estatdiskfull")  # fmt: skip
    limit = total(after, "process_memory_limit_bytes")
    if limit:
        mem = total(after, "process_resident_memory_bytes") / limit
        add("memory", grade(mem, 0.85, 0.95), f"{mem:.0%} of the limit", "WARN > 85 %, CRIT > 95 %",
            "estatmemoryhigh")  # fmt: skip
    gaps = {k: v for k, v in by_label(after, "completeness_gap_events", "dataset").items() if v}
    add("completeness", "CRIT" if gaps else "OK",
        ", ".join(f"{d}: {n:.0f} missing" for d, n in sorted(gaps.items())) or "no gap",
        "CRIT any event of a closed hour not in the lake", "estatcompletenessgap")  # fmt: skip
    failed = by_label(after, "stage_failures_total", "stage")
    failed = {k: v for k, v in failed.items() if v}
    add("failed stages", "CRIT" if failed else "OK", ", ".join(sorted(failed)) or "none",
        "CRIT any", "estatstagefailed")  # fmt: skip
    src = by_label(after, "source_outbox_rows", "status")
    add("source outbox", "CRIT" if src.get("PARKED") else "WARN" if src.get("FAILED") else "OK",
        f"FAILED {src.get('FAILED', 0):.0f}, PARKED {src.get('PARKED', 0):.0f}, "
        f"PENDING {src.get('PENDING', 0):.0f}", "WARN FAILED > 0, CRIT PARKED > 0",
        "estatsourceoutboxparked")  # fmt: skip
    behind = total(after, "source_outbox_oldest_due_age_seconds")
    add("relay behind", grade(behind, 300, 600), f"oldest due row {behind:.0f} s old",
        "WARN > 5 min, CRIT > 10 min", "estatrelaybehind")  # fmt: skip
    bus_lost = total(after, "mq_bus_lost_total")
    add("bus data lost", "CRIT" if bus_lost else "OK", f"{bus_lost:.0f} since start",
        "CRIT > 0 (its unread events: estat store backfill)", "estatbuslostdata")  # fmt: skip
    parked = total(after, "mq_parked_messages")
    add("bus parked", "CRIT" if parked else "OK", f"{parked:.0f}", "CRIT > 0", "estatbusparked")
    for target in sorted(by_label(after, "dispatch_outbox_rows", "target")):
        rows = by_label(after, "dispatch_outbox_rows", "status", target=target)
        add(f"dispatch {target}",
            "CRIT" if rows.get("PARKED") else "WARN" if rows.get("FAILED") else "OK",
            f"FAILED {rows.get('FAILED', 0):.0f}, PARKED {rows.get('PARKED', 0):.0f}, "
            f"PENDING {rows.get('PENDING', 0):.0f}", "WARN FAILED > 0, CRIT PARKED > 0",
            "estatdispatchparked")  # fmt: skip
        age = total(after, "dispatch_oldest_due_age_seconds", target=target)
        add(f"dispatch {target} behind", grade(age, 900, 3600),
            f"oldest due row {age:.0f} s old", "WARN > 15 min, CRIT > 1 h",
            "estatdispatchbehind")  # fmt: skip
    for target, state in sorted(by_label(after, "dispatch_circuit_state", "target").items()):
        refused = total(after, "dispatch_config_error", target=target)
        add(f"circuit {target}",
            "CRIT" if state == 2 or refused else "WARN" if state == 1 else "OK",
            {0: "closed", 1: "half-open", 2: "open"}.get(int(state), str(state))
            + (", credentials refused" if refused else ""),
            "WARN half-open, CRIT open or credentials refused", "estatdispatchcircuitopen")  # fmt: skip
    paused = sorted(k for k, v in by_label(after, "worker_paused", "worker").items() if v)
    add("paused workers", "WARN" if paused else "OK", ", ".join(paused) or "none",
        "WARN any (its backlog grows)", "docs/admin.md#pausing-a-worker")  # fmt: skip
    return out


def table(rows: list[Check]) -> str:
    cols = ["name", "status", "value", "threshold", "runbook"]
    cells = [[str(getattr(r, c)) for c in cols] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def run_doctor(args: argparse.Namespace, sleep: Callable[[float], None] = time.sleep) -> int:
    import httpx  # here, not at import: the parser is built before signals are held

    from estat.settings.admin import admin_url

    url = (args.url or admin_url()).rstrip("/")
    token = args.token or os.environ.get("ESTAT_ADMIN_TOKEN")
    headers = {"authorization": f"Bearer {token}"} if token else {}
    try:
        with httpx.Client(base_url=url, timeout=10, headers=headers) as client:
            before = parse(client.get("/metrics").raise_for_status().text)
            t0 = time.monotonic()
            sleep(max(0.0, args.interval))
            after = parse(client.get("/metrics").raise_for_status().text)
            seconds = max(time.monotonic() - t0, 1e-3)
            ready = client.get("/ready").json()
    except (httpx.HTTPError, ValueError) as e:
        print(f"estat doctor: the admin listener at {url} did not answer: {e}", file=sys.stderr)
        return 2
    rows = checks(before, after, seconds, ready if isinstance(ready, dict) else {})
    worst = max((LEVELS[r.status] for r in rows), default=0)
    if args.json:
        verdict = next(k for k, v in LEVELS.items() if v == worst)
        print(json.dumps({"status": verdict, "checks": [asdict(r) for r in rows]}))
    else:
        print(table(rows))
    return worst
