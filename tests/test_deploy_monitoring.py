"""deploy/prometheus and deploy/grafana: promtool checks and unit-tests the alert rules; the
alerts follow the monitoring-mixins conventions; every query of the rules and the dashboard is
valid PromQL over metrics the coordinator exports, with labels those metrics have."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from syncnorm.coordinator.service import Coordinator, CoordinatorCollector
from syncnorm.coordinator.v1 import coordinator_pb2 as pb
from tests.dashboard import DASHBOARD, load_dashboard, panel_queries

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
GRAFANA_DIR = ROOT / "deploy" / "grafana"
RULES = PROMETHEUS_DIR / "syncnorm.rules.yml"
RULE_TESTS = PROMETHEUS_DIR / "syncnorm.rules.test.yml"
ALERTS = {
    "SyncnormStatsDriftHigh", "SyncnormBatchSizeMismatch", "SyncnormWorkerStale",
    "SyncnormRunningStatsDiverged", "SyncnormReportsRejected",
}  # fmt: skip
TARGET_LABELS = {"job", "instance"}  # what Prometheus adds to every scraped series


def _promtool(promtool: str, *args: str, cwd: Path = PROMETHEUS_DIR) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def _exported() -> dict[str, set[str]]:
    """Sample name -> label names, as the coordinator's collector exports them for a run."""
    coordinator = Coordinator()
    for worker, batch in (("w0", 8), ("w1", 24)):
        layer = pb.LayerStats(layer="features.1", count=batch, mean=[0.0, 1.0], var=[1.0, 1.0],
                              running_mean=[0.0, 0.0], running_var=[1.0, 1.0])  # fmt: skip
        coordinator.report(pb.ReportRequest(run_id="r", worker_id=worker, step=1, batch_size=batch,
                                            step_time_seconds=0.1, layers=[layer]))  # fmt: skip
    metrics: dict[str, set[str]] = {}
    for family in CoordinatorCollector(coordinator).collect():
        for sample in family.samples:
            metrics.setdefault(sample.name, set()).update(sample.labels)
    return metrics


def _alerts() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def _check_query(expr: str, exported: dict[str, set[str]], used_labels: set[str] = frozenset()) -> set[str]:
    """Fails unless ``expr`` uses exported metrics and only their labels; returns the labels
    its series can carry (for legends and annotations)."""
    names = set(re.findall(r"\bsyncnorm_\w+", expr))
    assert names, f"no syncnorm metric in {expr!r}"
    unknown = names - set(exported)
    assert not unknown, f"{expr!r} uses {unknown}, which the coordinator does not export"
    labels = set().union(*(exported[name] for name in names)) | TARGET_LABELS
    for name, matchers in re.findall(r"(syncnorm_\w+)\s*\{([^}]*)\}", expr):
        for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers):
            assert label in exported[name] | TARGET_LABELS, f"{name} has no label {label!r} ({expr!r})"
    for group in re.findall(r"\b(?:by|on|without|ignoring|group_left|group_right)\s*\(([^)]*)\)", expr):
        for label in re.findall(r"\w+", group):
            assert label in labels, f"no metric of {expr!r} has the label {label!r}"
    missing = used_labels - labels
    assert not missing, f"{sorted(missing)} used with {expr!r}, whose series have only {sorted(labels)}"
    return labels


def test_promtool_checks_the_config_and_rules_and_runs_their_unit_tests(promtool) -> None:
    for args in (("check", "config", "prometheus.yml"), ("check", "rules", RULES.name),
                 ("test", "rules", RULE_TESTS.name)):  # fmt: skip
        result = _promtool(promtool, *args)
        assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}{result.stderr}"
    assert "SUCCESS: 5 rules found" in _promtool(promtool, "check", "rules", RULES.name).stdout


@pytest.mark.parametrize("alert", sorted(ALERTS))
def test_each_alert_s_unit_tests_fail_when_the_alert_never_fires(promtool, tmp_path, alert) -> None:
    rules = yaml.safe_load(RULES.read_text())
    for rule in rules["groups"][0]["rules"]:
        if rule["alert"] == alert:
            rule["expr"] = "vector(1) < 0"
    (tmp_path / RULES.name).write_text(yaml.safe_dump(rules))
    (tmp_path / RULE_TESTS.name).write_text(RULE_TESTS.read_text())
    result = _promtool(promtool, "test", "rules", RULE_TESTS.name, cwd=tmp_path)
    assert result.returncode != 0
    assert f"alertname: {alert}" in result.stdout + result.stderr


def test_alerts_follow_the_monitoring_mixin_conventions_and_each_has_unit_tests() -> None:
    alerts = _alerts()
    assert {a["alert"] for a in alerts} == ALERTS
    tests = yaml.safe_load(RULE_TESTS.read_text())
    cases = [case for group in tests["tests"] for case in group.get("alert_rule_test", [])]
    for alert in alerts:
        assert re.fullmatch(r"Syncnorm(?:[A-Z][a-z]+)+", alert["alert"]), alert["alert"]
        assert alert["labels"]["severity"] in ("critical", "warning", "info"), alert["alert"]
        assert set(alert["annotations"]) == {"summary", "description"}, alert["alert"]
        own = [c for c in cases if c["alertname"] == alert["alert"]]
        assert any(c.get("exp_alerts") for c in own), f"no test where {alert['alert']} fires"
        assert any(not c.get("exp_alerts") for c in own), f"no test where {alert['alert']} stays silent"


def test_readme_table_states_each_alert_s_threshold_duration_and_severity() -> None:
    readme = (ROOT / "README.md").read_text()
    for alert in _alerts():
        (row,) = [line for line in readme.splitlines() if line.startswith(f"| `{alert['alert']}` |")]
        cells = [cell.strip() for cell in row.split("|")[1:-1]]
        assert cells[2] == alert.get("for", "at once") and cells[3] == f"`{alert['labels']['severity']}`", row
        for threshold in re.findall(r"[<>]\s*([\d.]+)", alert["expr"]):
            assert re.search(rf"(?<![\d.]){re.escape(threshold)}(?![\d.])", cells[1]), (threshold, row)


def test_rules_use_exported_metrics_and_their_labels() -> None:
    exported = _exported()
    for alert in _alerts():
        used = set(re.findall(r"\$labels\.(\w+)", str(alert["annotations"])))
        _check_query(alert["expr"], exported, used)


def test_dashboard_queries_use_exported_metrics_their_labels_and_the_run_variable() -> None:
    exported = _exported()
    dashboard = load_dashboard()
    (variable,) = dashboard["templating"]["list"]
    assert variable["name"] == "run"
    name, label = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", variable["query"]["query"]).groups()
    assert label in exported[name] and (variable["query"]["metric"], variable["query"]["label"]) == (
        name,
        label,
    )
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        for target in panel["targets"]:
            used = set(re.findall(r"\{\{(\w+)\}\}", target.get("legendFormat", "")))
            _check_query(target["expr"], exported, used)
            for metric in re.findall(r"\bsyncnorm_\w+", target["expr"]):
                if "run" in exported[metric]:
                    assert f'{metric}{{run="$run"' in target["expr"], (
                        f"{panel['title']!r}: {metric} unfiltered"
                    )
    titles = " ".join(p["title"] for p in panels).lower()
    for wanted in ("batch size per worker", "mismatch", "drift per worker", "top layers by drift",
                   "divergence", "last report", "reports per second"):  # fmt: skip
        assert wanted in titles


def test_dashboard_queries_are_valid_promql(promtool, tmp_path) -> None:
    rules = [
        {"record": f"dashboard:query_{i}", "expr": q.expr}
        for i, q in enumerate(panel_queries("r", rate_interval="1m"))
    ]
    (tmp_path / "dashboard.rules.yml").write_text(
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]})
    )
    result = _promtool(promtool, "check", "rules", "dashboard.rules.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def test_grafana_provisioning_points_at_prometheus_and_the_dashboard() -> None:
    (source,) = yaml.safe_load((GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    uids = {p["datasource"]["uid"] for p in load_dashboard()["panels"]} | {
        t["datasource"]["uid"] for p in load_dashboard()["panels"] for t in p["targets"]
    }
    assert uids == {source["uid"]}
    (provider,) = yaml.safe_load((GRAFANA_DIR / "provisioning" / "dashboards" / "syncnorm.yml").read_text())[
        "providers"
    ]
    assert provider["type"] == "file" and DASHBOARD.parent.name == "dashboards"
