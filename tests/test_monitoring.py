"""The shipped Grafana dashboard and Prometheus rules use only metrics fededge exports.

Every metric name in ``configs/grafana/fededge.json`` and ``configs/prometheus/fededge-rules.yml``
must be exported by the aggregator's or a device's registry (or be one of the few named
node_exporter/Prometheus series below), so a renamed metric breaks this test instead of a
dashboard. With ``promtool`` installed (CI installs it), the rules are checked and unit-tested
and every dashboard query is parsed as PromQL.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry
from test_aggregator_core import Harness

from fededge.device.metrics import DeviceMetrics
from fededge.protocol import Plan

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "configs" / "grafana" / "fededge.json"
RULES = ROOT / "configs" / "prometheus" / "fededge-rules.yml"
RULES_TEST = ROOT / "configs" / "prometheus" / "fededge-rules.test.yml"
#: Series that come from Prometheus itself or node_exporter, not from fededge.
EXTERNAL = {"up", "node_textfile_mtime_seconds"}
#: PromQL functions, aggregations and keywords (everything else an identifier can be).
PROMQL_WORDS = {
    "and", "or", "unless", "offset", "bool", "sum", "avg", "min", "max", "count", "count_values",
    "topk", "bottomk", "quantile", "rate", "irate", "increase", "changes", "resets", "delta",
    "idelta", "deriv", "time", "histogram_quantile", "clamp_min", "clamp_max", "abs",
    "max_over_time", "min_over_time", "avg_over_time", "absent", "vector", "scalar", "inf",
}  # fmt: skip
SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
}


def exported(registry: CollectorRegistry) -> set[str]:
    """Every series name the registry exposes, labelled families without children included."""
    return {
        family.name + suffix for family in registry.collect() for suffix in SUFFIXES[family.type]
    }


def metric_names(expr: str) -> set[str]:
    """The metric names an expression reads (strings, durations, labels and functions removed)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # string literals
    expr = re.sub(r"\$\{?\w+\}?", "", expr)  # Grafana variables
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range and subquery durations
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\b[a-zA-Z_]\w*\s*(=~|!~|!=|=)", "", expr)  # label matchers
    expr = re.sub(r"\boffset\s+\d+\w*", "", expr)
    words = set(re.findall(r"[a-zA-Z_:][\w:]*", expr))
    return {w for w in words if w not in PROMQL_WORDS and not re.fullmatch(r"\d+\w*", w)}


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def rule_exprs() -> list[str]:
    doc = yaml.safe_load(RULES.read_text())
    return [str(r["expr"]) for g in doc["groups"] for r in g["rules"]]


@pytest.fixture(scope="module")
def known(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    h = Harness(tmp_path_factory.mktemp("agg"), Plan(min_updates_per_version=2))
    return exported(h.metrics.registry) | exported(DeviceMetrics().registry) | EXTERNAL


def test_metric_name_extraction() -> None:
    expr = (
        'histogram_quantile(0.9, sum by (job, le) (rate(a_bucket{job=~"$job", le!="x"}[5m])))'
        ' / ignoring(le) b_total offset 1h > 0.2 and count_values("version", c) unless d{x="y"}'
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "c", "d"}


@pytest.mark.parametrize("source", ["dashboard", "rules"])
def test_configs_use_only_exported_metrics(source: str, known: set[str]) -> None:
    exprs = dashboard_exprs() if source == "dashboard" else rule_exprs()
    used = set().union(*(metric_names(e) for e in exprs))
    assert len(exprs) >= 15 and len(used) >= 15, (len(exprs), used)
    assert used <= known, sorted(used - known)


def test_dashboard_covers_the_fleet_operations_panels() -> None:
    used = set().union(*(metric_names(e) for e in dashboard_exprs()))
    for name in (
        "fededge_versions_published_total", "fededge_updates_accepted_total",
        "fededge_updates_rejected_total", "fededge_wal_commit_duration_seconds_bucket",
        "fededge_fleet_devices_online", "fededge_fleet_version_lag_bucket",
        "fededge_privacy_epsilon", "fededge_secure_round_stage",
        "fededge_device_train_seconds_total", "fededge_device_predictions_total",
    ):  # fmt: skip
        assert name in used, name


PROMTOOL = shutil.which("promtool")
# CI installs promtool (.ci/run) and sets CI_REQUIRE_PROMTOOL: there a missing promtool is
# a failure, not a skip; elsewhere (a developer without the prometheus package) the tests skip.
if PROMTOOL is None and os.environ.get("CI_REQUIRE_PROMTOOL"):
    raise RuntimeError("CI_REQUIRE_PROMTOOL is set but promtool is not on PATH")


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (apt-get install prometheus)")
def test_promtool_checks_and_unit_tests_the_rules() -> None:
    assert PROMTOOL is not None
    for args in (["check", "rules", str(RULES)], ["test", "rules", str(RULES_TEST)]):
        run = subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (apt-get install prometheus)")
def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """Each query as a recording rule: promtool parses it (Grafana variables filled in)."""
    assert PROMTOOL is not None
    rules = [
        {
            "record": f"dashboard:q{i}",
            "expr": e.replace("$__rate_interval", "5m").replace("$job", ".+"),
        }
        for i, e in enumerate(dashboard_exprs())
    ]
    path = tmp_path / "dashboard.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    run = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
