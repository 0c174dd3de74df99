from __future__ import annotations

import json
import subprocess
import sys

from prometheus_client import CollectorRegistry, Histogram

from estat.ops.hist import FastHistogram
from estat.ops.metrics import LATENCY_BUCKETS, Metrics


def test_fast_histogram_folds_exactly_into_the_histogram() -> None:
    reg = CollectorRegistry()
    fast_target = Histogram("fast", "f", buckets=LATENCY_BUCKETS, registry=reg)
    slow = Histogram("slow", "s", buckets=LATENCY_BUCKETS, registry=reg)
    fast = FastHistogram(fast_target, LATENCY_BUCKETS)
    values = [0.00005, 0.0001, 0.0003, 0.001, 0.02, 0.0999, 3.0, 42.0, 0.0]
    for v in values:
        fast.observe(v)
        slow.observe(v)
    fast.flush()
    fast.flush()  # idempotent: nothing counted twice
    for bound in [*LATENCY_BUCKETS, float("inf")]:
        le = "+Inf" if bound == float("inf") else str(bound)
        assert reg.get_sample_value("fast_bucket", {"le": le}) == reg.get_sample_value(
            "slow_bucket", {"le": le}
        ), le
    assert reg.get_sample_value("fast_sum") == reg.get_sample_value("slow_sum")


def test_tallies_are_flushed_once() -> None:
    m = Metrics(CollectorRegistry())
    t = m.tally(m.http_requests)
    t.n += 5
    m.flush()
    m.flush()
    t.n += 2
    text = m.exposition().decode()
    assert "http_requests_total 7.0" in text


def test_seed_metric_names_are_exported() -> None:
    text = Metrics(CollectorRegistry()).exposition().decode()
    for name in (
        "http_requests_total",
        "http_requests_accepted_total",
        "http_requests_rejected_body_too_large_total",
        "http_requests_rejected_queue_full_total",
        "s3_events_stored_total",
        "s3_put_errors_total",
        "dlq_events_enqueued_total",
        "dlq_events_reuploaded_total",
        "dlq_events_dropped_total",
        "dlq_files_expired_total",
        "dlq_files_current",
        "dlq_size_bytes",
    ):
        assert f"\n{name} " in text or text.startswith(f"{name} "), name


def test_json_log_lines_have_the_contract_fields() -> None:
    code = (
        "from estat.ops.logging import setup_logging, get_logger\n"
        "setup_logging('info', env='prod')\n"
        "get_logger('t').warning('lake upload failed', batchKey='raw/x', durationMs=1.5)\n"
        "get_logger('t').debug('hidden')\n"
        # a database thread's line (the dispatch circuit's transitions): the same fields
        "import threading\n"
        "t = threading.Thread(target=lambda: get_logger('t').warning('from a thread'))\n"
        "t.start(); t.join()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    lines = [json.loads(x) for x in out.stdout.splitlines()]
    assert len(lines) == 2
    line, threaded = lines
    assert {k: threaded[k] for k in ("service", "env", "level")} == {
        "service": "estat", "env": "prod", "level": "warning",
    }  # fmt: skip
    assert line["level"] == "warning"
    assert line["msg"] == "lake upload failed"
    assert line["service"] == "estat"
    assert line["env"] == "prod"
    assert line["batchKey"] == "raw/x"
    assert line["time"].endswith("Z")


def test_every_metric_is_in_the_runbook() -> None:
    """The runbook is the operator's reference: a metric it does not explain
    cannot be acted on."""
    from pathlib import Path

    runbook = (Path(__file__).resolve().parents[2] / "docs" / "runbook.md").read_text()
    m = Metrics(CollectorRegistry())
    names = set()
    for metric in m.registry.collect():
        name = metric.name + ("_total" if metric.type == "counter" else "")
        names.add(name)
    missing = sorted(n for n in names if f"`{n}" not in runbook)
    assert missing == []


def test_every_error_line_is_counted_by_its_reason() -> None:
    code = (
        "from prometheus_client import CollectorRegistry\n"
        "from estat.ops.logging import setup_logging, get_logger, count_errors\n"
        "from estat.ops.metrics import Metrics\n"
        "m = Metrics(CollectorRegistry())\n"
        "setup_logging('info')\n"
        "count_errors(lambda r: m.log_errors.labels(r).inc())\n"
        "log = get_logger('t')\n"
        "log.error('local DLQ save failed', reason='No space left on device')\n"
        "log.error('DLQ capacity → removed=1_a_000001.jsonl.gz', events=3)\n"
        "log.error('DLQ capacity → removed=1_a_000002.jsonl.gz', events=2)\n"
        "try:\n    1 / 0\nexcept ZeroDivisionError:\n    log.exception('destination failed')\n"
        "log.warning('lake upload failed')\n"
        "print(m.exposition().decode())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    counted = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in out.stdout.splitlines()
        if line.startswith("log_errors_total{")
    }
    assert counted == {
        'log_errors_total{reason="local DLQ save failed"}': 1.0,
        'log_errors_total{reason="DLQ capacity → removed"}': 2.0,  # one label, not one per file
        'log_errors_total{reason="destination failed"}': 1.0,
    }  # the warning is not counted


def test_libraries_log_records_are_json_lines_of_their_own_counted_by_logger() -> None:
    """asyncio's "Task exception was never retrieved", nats-py's reconnect
    errors, SQLAlchemy's pool warnings: plain text with multi-line
    tracebacks on stderr before, which a JSON log pipeline cannot parse."""
    code = (
        "import asyncio, gc, logging\n"
        "from prometheus_client import CollectorRegistry\n"
        "from estat.ops.logging import setup_logging, count_errors\n"
        "from estat.ops.metrics import Metrics\n"
        "m = Metrics(CollectorRegistry())\n"
        "setup_logging('info', env='prod')\n"
        "count_errors(lambda r: m.log_errors.labels(r).inc())\n"
        "async def boom():\n    raise RuntimeError('lost in a task')\n"
        "async def main():\n"
        "    t = asyncio.ensure_future(boom())\n    await asyncio.sleep(0.01)\n    del t\n"
        "    gc.collect()\n"
        "asyncio.run(main())\n"
        "logging.getLogger('sqlalchemy.pool').warning('pool %s overflow', 'p1')\n"
        "logging.getLogger('sqlalchemy.pool').info('below WARNING: not written')\n"
        "print(m.exposition().decode())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stderr == ""
    lines = [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]
    task, pool = lines
    assert (task["logger"], task["level"], task["env"]) == ("asyncio", "error", "prod")
    assert task["msg"].startswith("Task exception was never retrieved")
    assert "RuntimeError: lost in a task" in task["exception"]
    assert (pool["logger"], pool["level"], pool["msg"]) == (
        "sqlalchemy.pool",
        "warning",
        "pool p1 overflow",
    )
    assert 'log_errors_total{reason="library asyncio"} 1.0' in out.stdout


def test_client_addresses_are_masked_in_info_lines() -> None:
    from estat.ops.logging import mask_ip

    assert mask_ip("203.0.113.77") == "203.0.113.0/24"
    assert mask_ip("2001:db8:abcd:12::1") == "2001:db8:abcd::/48"
    assert mask_ip("127.0.0.1") == "127.0.0.1"  # the host itself
    assert mask_ip("testclient") == "testclient"


def test_a_failing_error_counter_never_breaks_logging() -> None:
    code = (
        "from estat.ops.logging import setup_logging, get_logger, count_errors\n"
        "setup_logging('info')\n"
        "def boom(reason):\n    raise OSError(24, 'Too many open files')\n"
        "count_errors(boom)\n"
        "get_logger('t').error('local DLQ save failed', reason='EMFILE')\n"
        "print('still here')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "local DLQ save failed" in out.stdout
    assert out.stdout.rstrip().endswith("still here")


def test_a_single_process_exposes_no_created_series() -> None:
    """`estat serve`'s multiprocess collector has no `*_created` samples; a
    role process (`estat store`) exposed one per counter and histogram (90
    extra series), so the same dashboards saw different series by role."""
    m = Metrics(CollectorRegistry())
    m.bus_lost.labels("redis-stream").inc()
    m.store_events.labels("inserted").inc(3)
    text = m.exposition().decode()
    assert 'mq_bus_lost_total{provider="redis-stream"} 1.0' in text
    assert "_created" not in text
