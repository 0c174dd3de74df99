"""deploy/prometheus/estat-alerts.yml, checked by real tools: promtool's
syntax check and its unit tests (a case firing every alert), a severity and
a runbook anchor that exists for every alert, and only metrics estat
exports in the expressions."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from estat.ops.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "estat-alerts.yml"
TESTS = ROOT / "deploy" / "prometheus" / "estat-alerts.test.yml"
PROMQL_WORDS = {
    "sum", "max", "min", "by", "rate", "increase", "deriv", "changes", "histogram_quantile",
    "and", "or", "unless", "le", "offset", "status", "result", "target", "job", "instance",
    "stage", "dataset", "on", "topic", "provider",
}  # fmt: skip


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is missing: `make test` installs Debian's prometheus package")
    return path


def alerts() -> list[dict[str, object]]:
    doc = yaml.safe_load(RULES.read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def exported_names() -> set[str]:
    names = {"up"}
    for metric in Metrics(CollectorRegistry()).registry.collect():
        for sample in metric.samples or []:
            names.add(sample.name)
        names.add(metric.name)
        if metric.type == "counter":
            names.add(metric.name + "_total")
        if metric.type == "histogram":
            names |= {metric.name + s for s in ("_bucket", "_count", "_sum")}
    return names


def slugs(markdown: str) -> set[str]:
    out = set()
    for line in markdown.splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", title)))
    return out


def test_promtool_checks_the_rules() -> None:
    run = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in run.stdout


def test_promtool_unit_tests_pass() -> None:
    run = subprocess.run(
        [promtool(), "test", "rules", str(TESTS)], capture_output=True, text=True, cwd=TESTS.parent
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_every_alert_has_a_case_that_fires_it() -> None:
    fired = set()
    for case in yaml.safe_load(TESTS.read_text())["tests"]:
        for t in case.get("alert_rule_test", []):
            if t["exp_alerts"]:
                fired.add(t["alertname"])
    assert {str(a["alert"]) for a in alerts()} - fired == set()


def test_every_alert_has_a_severity_and_a_runbook_section() -> None:
    anchors = slugs((ROOT / "docs" / "runbook.md").read_text())
    for a in alerts():
        labels, ann = a["labels"], a["annotations"]
        assert isinstance(labels, dict)
        assert isinstance(ann, dict)
        assert labels["severity"] in ("P0", "P1", "P2"), a["alert"]
        url = str(ann["runbook_url"])
        assert url.startswith("docs/runbook.md#"), a["alert"]
        assert url.split("#", 1)[1] in anchors, f"{a['alert']}: no section {url}"
        assert ann.get("summary"), a["alert"]


def test_the_rules_name_only_metrics_estat_exports() -> None:
    names = exported_names()
    for a in alerts():
        expr = re.sub(r'"[^"]*"', "", str(a["expr"]))  # label values
        expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
        used = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr)) - PROMQL_WORDS
        assert used <= names, f"{a['alert']}: {sorted(used - names)}"
