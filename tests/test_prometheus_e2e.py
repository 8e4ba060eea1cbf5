"""The monitoring path end to end, on loopback: docker-compose.yml's two torchrun workers (8
and 24 images per step, rank 0's pixels shifted) report to a real ``syncnorm coordinator``;
a real Prometheus, run from deploy/prometheus (targets and intervals rewritten, the rules
unchanged), scrapes it and evaluates the alerts; every dashboard query answers."""

from __future__ import annotations

import math
import subprocess
import time
import urllib.request
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from syncnorm.train.data import load_digits, steps_per_epoch
from tests.dashboard import panel_queries
from tests.processes import (
    PROMETHEUS_DIR,
    compose_worker_command,
    start_compose_workers,
    start_coordinator_command,
    start_prometheus,
    stop,
)

SHIFT = 2.0  # added to rank 0's pixels, which lie in [0, 1]
REPORT_EVERY = 5
TRAINING_DEADLINE_S = 120
T = TypeVar("T")


def _wait_for(what: str, probe: Callable[[], T | None], deadline_s: float, diagnose: Callable[[], str]) -> T:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        answer = probe()
        if answer:
            return answer
        time.sleep(0.5)
    pytest.fail(f"no {what} within {deadline_s} s\n{diagnose()}")


def _by(label: str, result: list[dict[str, Any]]) -> dict[str, float]:
    return {series["metric"].get(label, ""): float(series["value"][1]) for series in result}


def _coordinator_metrics(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@pytest.mark.timeout(240)
def test_prometheus_scrapes_the_coordinator_evaluates_the_alerts_and_answers_the_dashboard(
    tmp_path, prometheus_server_binary
) -> None:
    command = compose_worker_command()
    run = command[command.index("--run-id") + 1]
    sizes = tuple(int(n) for n in command[command.index("--batch-sizes") + 1].split(","))
    assert sizes == (8, 24)
    reports = 2 * math.ceil(steps_per_epoch(len(load_digits(0).train_y), sizes) / REPORT_EVERY)

    # stale only after an hour: the finished workers' last reports stay live while we look
    coordinator, grpc_port, metrics_port = start_coordinator_command("--stale-after", "3600")
    prometheus, workers = None, []
    try:
        prometheus = start_prometheus(tmp_path / "prometheus", metrics_port)
        workers = start_compose_workers(
            grpc_port, epochs=1, report_every=REPORT_EVERY, extra_train_args=("--input-shift", f"0:{SHIFT}"),
            log_dir=tmp_path,
        )  # fmt: skip

        def diagnose() -> str:
            logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(tmp_path.glob("*.log")))
            return f"{logs}\n--- prometheus\n{prometheus.log_tail() if prometheus else ''}"

        def scraped(expr: str) -> Callable[[], dict[str, float] | None]:
            return lambda: _by("worker", prometheus.query(expr)) or None

        # During training: Prometheus has the workers' batch sizes from the coordinator.
        _wait_for("mismatch ratio of 3 in Prometheus", lambda: _by("run", prometheus.query(
            f'syncnorm_batch_size_mismatch_ratio{{run="{run}"}} == 3')), 60, diagnose)  # fmt: skip
        for worker in workers:
            try:
                code = worker.wait(timeout=TRAINING_DEADLINE_S)
            except subprocess.TimeoutExpired:
                pytest.fail(f"training did not end within {TRAINING_DEADLINE_S} s\n{diagnose()}")
            assert code == 0, diagnose()
        _wait_for(f"all {reports} reports scraped", lambda: _by("run", prometheus.query(
            f'syncnorm_reports_total{{run="{run}"}} == {reports}')), 30, diagnose)  # fmt: skip

        # The training is over: Prometheus holds exactly the coordinator's numbers.
        batch = scraped(f'syncnorm_worker_batch_size{{run="{run}"}}')()
        assert batch == {"rank-0": 8, "rank-1": 24}
        drift = scraped(f'syncnorm_worker_stats_drift{{run="{run}"}}')()
        ours = _coordinator_metrics(metrics_port)
        for worker, value in drift.items():
            assert value == ours[("syncnorm_worker_stats_drift", (("run", run), ("worker", worker)))]
        # Both latest reports come from the same step, and the global mean is count-weighted:
        # 8 (mu_0 - mu_g) + 24 (mu_1 - mu_g) = 0 in every channel of every layer, so rank 1's
        # drift is exactly 8/24 of the shifted rank 0's, whatever the weights have become.
        assert drift["rank-1"] == pytest.approx(drift["rank-0"] * 8 / 24, rel=1e-9)
        assert drift["rank-0"] > 0.5 > drift["rank-1"]  # the alert's threshold lies between
        layers = _by("layer", prometheus.query(f'syncnorm_layer_stats_drift{{run="{run}"}}'))
        assert max(layers.values()) == pytest.approx(drift["rank-0"], rel=1e-12)
        assert _by("run", prometheus.query(f'syncnorm_running_stats_divergence{{run="{run}"}}')) == {run: 0.0}

        # The rules, unchanged from deploy/prometheus, evaluate without error; the drift alert
        # is pending (its for: is 10 minutes) or firing for the shifted worker only.
        names = {
            r["name"]: r
            for g in prometheus.api("rules")["groups"]
            for r in g["rules"]
            if r["type"] == "alerting"
        }
        rules_file = yaml.safe_load((PROMETHEUS_DIR / "syncnorm.rules.yml").read_text())
        assert set(names) == {r["alert"] for g in rules_file["groups"] for r in g["rules"]}
        assert all(r["health"] == "ok" for r in names.values()), names

        # Alerts follow the final values within an evaluation or two (a brief excursion during
        # training may have left one pending until the next evaluation).
        def settled() -> list[dict[str, Any]] | None:
            alerts = prometheus.api("alerts")["alerts"]
            active = {(a["labels"]["alertname"], a["labels"].get("worker")) for a in alerts}
            return alerts if active == {("SyncnormStatsDriftHigh", "rank-0")} else None

        # 3x mismatch, no divergence, no rejection, nobody stale: only the shifted worker's drift
        (alert,) = _wait_for("only SyncnormStatsDriftHigh for rank-0", settled, 15, diagnose)
        assert alert["state"] in ("pending", "firing") and alert["labels"]["severity"] == "warning"
        assert float(alert["value"]) == pytest.approx(drift["rank-0"], rel=1e-12)

        # Every dashboard query runs on the real server and has data for this run.
        for query in panel_queries(run, rate_interval="10s"):
            assert prometheus.query(query.expr), f"panel {query.panel!r}: no data for {query.expr}"
    finally:
        for worker in workers:
            stop(worker)
        if prometheus is not None:
            prometheus.stop()
        stop(coordinator)


@pytest.mark.timeout(240)
def test_render_dashboard_draws_every_panel_from_a_real_run(tmp_path, prometheus_server_binary) -> None:
    import sys

    from tests.dashboard import load_dashboard
    from tests.processes import ROOT

    out = tmp_path / "panels.png"
    script = subprocess.Popen(
        [sys.executable, "scripts/render_dashboard.py", "--out", str(out), "--epochs", "1", "--linger", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = script.communicate(timeout=200)
    finally:
        stop(script, timeout_s=30)  # SIGTERM: the script stops its coordinator, Prometheus and workers
    assert script.returncode == 0, stdout + stderr[-3000:]
    assert f"{len(load_dashboard()['panels'])} panels" in stdout and "no data" not in stdout
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
