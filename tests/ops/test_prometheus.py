"""A real Prometheus (Debian's binary) scraping a real ``estat serve``'s
admin listener with estat's alert rules loaded: the counters estat
incremented arrive with the right values, an alert fires when its
condition is produced for real (a lake nobody answers and a DLQ too small
for a batch: events dropped, EstatDlqEventsDropped firing), and every
query of the Grafana dashboard runs and names only metrics estat exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import EstatProcess, free_port, losing_lake_env

pytestmark = pytest.mark.e2e

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
RULES = DEPLOY / "prometheus" / "estat-alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "estat-overview.json"


class Prometheus:
    def __init__(self, workdir: Path, target: str) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.fail("prometheus is missing: `make test` installs Debian's prometheus package")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        workdir.mkdir(parents=True, exist_ok=True)
        shutil.copy(RULES, workdir / "estat-alerts.yml")
        (workdir / "prometheus.yml").write_text(
            json.dumps(  # JSON is YAML
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "rule_files": ["estat-alerts.yml"],
                    "scrape_configs": [
                        {"job_name": "estat", "static_configs": [{"targets": [target]}]}
                    ],
                }
            )
        )
        self.log = (workdir / "prometheus.log").open("wb")
        self.proc = subprocess.Popen(
            [
                binary, f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=5) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]

    def value(self, query: str) -> float | None:
        result = self.api("query", query=query)["result"]
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.log.close()


def wait(cond: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if cond():
                return
        except OSError:
            pass
        time.sleep(0.25)
    raise TimeoutError("not reached")


@pytest.fixture
def setup(estat_factory: Any, tmp_path: Path) -> Iterator[tuple[EstatProcess, Prometheus]]:
    p: EstatProcess = estat_factory(losing_lake_env())
    p.start()
    prom = Prometheus(tmp_path / "prometheus", f"127.0.0.1:{p.admin_port}")
    yield p, prom
    prom.stop()


def test_prometheus_scrapes_estat_and_fires_an_alert(
    setup: tuple[EstatProcess, Prometheus],
) -> None:
    p, prom = setup
    wait(lambda: prom.value('up{job="estat"}') == 1.0)
    body = b'{"event":"page_view","n":1}'
    sent = 0
    for _ in range(25):
        req = urllib.request.Request(p.url + "/collect", data=body, method="POST")
        with urllib.request.urlopen(req, timeout=5) as r:
            assert r.status == 200
        sent += 1
    own = p.metrics()
    wait(lambda: own_value(p, "dlq_events_dropped_total") == sent)
    # what Prometheus stored is what estat counted
    wait(lambda: prom.value("http_requests_accepted_total") == sent)
    wait(lambda: prom.value("dlq_events_dropped_total") == sent)
    assert own["http_requests_accepted_total"] == sent

    # the alert: P0, with its runbook anchor
    def firing() -> list[dict[str, Any]]:
        return [a for a in prom.api("alerts")["alerts"] if a["state"] == "firing"]

    wait(lambda: any(a["labels"]["alertname"] == "EstatDlqEventsDropped" for a in firing()))
    alert = next(a for a in firing() if a["labels"]["alertname"] == "EstatDlqEventsDropped")
    assert alert["labels"]["severity"] == "P0"
    assert alert["annotations"]["runbook_url"] == "docs/runbook.md#estatdlqeventsdropped"
    rules = prom.api("rules")["groups"]
    assert sum(len(g["rules"]) for g in rules) == len(
        [line for line in RULES.read_text().splitlines() if line.strip().startswith("- alert:")]
    )  # every rule loaded
    assert all(r["health"] == "ok" for g in rules for r in g["rules"])
    # every query of the dashboard parses and runs, with Grafana's variables
    # given values, and the ones on metrics estat has already set return data
    for q in dashboard_queries():
        expr = q.replace("$__rate_interval", "1m").replace("$__range", "1h")
        prom.api("query", query=expr)  # a syntax error is a 400: api() fails
    assert prom.value("max(lake_circuit_state)") is not None


def dashboard_queries() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    return [t["expr"] for panel in doc["panels"] for t in panel.get("targets", [])]


def test_the_dashboard_names_only_metrics_estat_exports() -> None:
    from tests.ops.test_alert_rules import PROMQL_WORDS, exported_names

    names = exported_names()
    words = PROMQL_WORDS | {"route", "reason", "error_class", "provider", "worker", "time"}
    for q in dashboard_queries():
        bare = re.sub(r'"[^"]*"', "", q)
        bare = re.sub(r"\[[^\]]*\]", "", bare)
        used = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", bare)) - words
        assert used <= names, f"{q}: {sorted(used - names)}"


def own_value(p: EstatProcess, name: str) -> float:
    return p.metrics().get(name, 0.0)
