"""Render the Grafana dashboard's panels from real data, without Grafana.

Runs what tests/test_prometheus_e2e.py runs (a ``syncnorm coordinator``, a Prometheus from
deploy/prometheus, docker-compose.yml's two torchrun workers with rank 0's pixels shifted),
asks Prometheus for every panel's queries of deploy/grafana/dashboards/syncnorm.json over the
run (``/api/v1/query_range``; instant queries for the stat and bar panels), and plots them
with matplotlib, thresholds dashed as the dashboard draws them.

    python scripts/render_dashboard.py --out deploy/grafana/panels.png   (about a minute)
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from tests.dashboard import PanelQuery, legend, load_dashboard, panel_queries
from tests.processes import (
    Prometheus,
    compose_worker_command,
    start_compose_workers,
    start_coordinator_command,
    start_prometheus,
    stop,
)


@dataclass
class Panel:
    title: str
    kind: str
    threshold: float | None
    unit: str
    series: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)  # legend -> (t, v)


def _threshold(panel: dict) -> float | None:
    steps = panel["fieldConfig"]["defaults"].get("thresholds", {}).get("steps", [])
    values = [s["value"] for s in steps if s["value"] is not None]
    return values[0] if values else None


def collect(
    workdir: Path, epochs: int, report_every: int, shift: float, linger_s: float
) -> tuple[list[Panel], list[str]]:
    """Run the stack; every panel's series from Prometheus, and its alerts at the end."""
    command = compose_worker_command()
    run = command[command.index("--run-id") + 1]
    coordinator, grpc_port, metrics_port = start_coordinator_command("--stale-after", "3600")
    prometheus, workers = None, []
    try:
        prometheus = start_prometheus(workdir / "prometheus", metrics_port)
        started = time.time()
        workers = start_compose_workers(
            grpc_port, epochs, report_every, ("--input-shift", f"0:{shift}"), workdir
        )
        for worker in workers:
            if worker.wait(timeout=600) != 0:
                logs = "\n".join(p.read_text()[-2000:] for p in sorted(workdir.glob("worker-*.log")))
                raise RuntimeError(f"a training worker failed:\n{logs}")
        time.sleep(linger_s)  # a few more scrapes: the panels show the run's end
        ended = time.time()
        by_title = {p["title"]: p for p in load_dashboard()["panels"]}
        panels: dict[str, Panel] = {}
        for query in panel_queries(run, rate_interval="10s"):
            source = by_title[query.panel]
            unit = source["fieldConfig"]["defaults"].get("unit", "")
            panel = panels.setdefault(query.panel, Panel(query.panel, query.kind, _threshold(source), unit))
            _read(prometheus, query, panel, started, ended)
        alerts = [
            f"{a['labels']['alertname']} {a['state']}"
            + "".join(f", {k} {a['labels'][k]}" for k in ("run", "worker", "reason") if k in a["labels"])
            for a in prometheus.api("alerts")["alerts"]
        ]
        return list(panels.values()), alerts
    finally:
        for worker in workers:
            stop(worker)
        if prometheus is not None:
            prometheus.stop()
        stop(coordinator)


def _read(prometheus: Prometheus, query: PanelQuery, panel: Panel, started: float, ended: float) -> None:
    if query.instant or query.kind != "timeseries":
        for series in prometheus.query(query.expr, at=ended):
            panel.series[legend(query.legend, series["metric"])] = (
                [ended - started],
                [float(series["value"][1])],
            )
        return
    for series in prometheus.query_range(query.expr, started, ended, 1.0):
        points = [(float(t) - started, float(v)) for t, v in series["values"]]
        panel.series[legend(query.legend, series["metric"])] = (
            [p[0] for p in points],
            [p[1] for p in points],
        )


def plot(panels: list[Panel], alerts: list[str], out: Path, caption: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = [p for p in panels if p.kind == "stat"]
    charts = [p for p in panels if p.kind != "stat"]
    columns = 2
    rows = (len(charts) + 1 + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(12, 3.0 * rows))
    cells = list(axes.flat)
    for ax, panel in zip(cells, charts, strict=False):
        ax.set_title(panel.title, fontsize=10)
        if panel.kind == "bargauge":
            names = sorted(panel.series, key=lambda n: panel.series[n][1][0])
            ax.barh(names, [panel.series[n][1][0] for n in names], color="tab:blue")
            ax.set_xlabel("at the end of the run")
            ax.set_ylabel("layer")
            if panel.threshold is not None:
                ax.axvline(panel.threshold, color="tab:red", linestyle="--", linewidth=1)
            continue
        for name, (t, v) in sorted(panel.series.items()):
            ax.plot(t, v, label=name, linewidth=1.5)
        if panel.threshold is not None:
            ax.axhline(panel.threshold, color="tab:red", linestyle="--", linewidth=1, label="alert threshold")
        ax.set_xlabel("seconds since the workers started")
        if panel.unit:
            ax.set_ylabel(panel.unit)
        ax.legend(fontsize=7, loc="best")
        ax.grid(alpha=0.3)
    summary = cells[len(charts)]
    summary.axis("off")
    lines = ["At the end of the run:"]
    lines += [f"{p.title}: " + ", ".join(f"{v[-1]:g}" for _, v in p.series.values()) for p in stats]
    lines += ["", "Alerts (the repository's rules, in Prometheus):", *(alerts or ["none"]), "", caption]
    summary.text(0, 1, "\n".join(lines), va="top", fontsize=9, wrap=True)
    for ax in cells[len(charts) + 1 :]:
        ax.axis("off")
    figure.suptitle("syncnorm dashboard panels, from a real run (Prometheus query_range)", fontsize=12)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=90)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("deploy/grafana/panels.png"))
    parser.add_argument("--epochs", type=int, default=30, help="about a second each on 2 cores")
    parser.add_argument("--report-every", type=int, default=5)
    parser.add_argument("--shift", type=float, default=2.0, help="added to rank 0's pixels (in [0, 1])")
    parser.add_argument("--linger", type=float, default=10.0, help="seconds to keep scraping after training")
    args = parser.parse_args(argv)
    # SIGTERM ends the script through its finally blocks, which stop what it started
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory(prefix="syncnorm-dashboard-") as workdir:
        panels, alerts = collect(Path(workdir), args.epochs, args.report_every, args.shift, args.linger)
    caption = (
        f"docker-compose.yml's workers on one machine: batch sizes 8 and 24, {args.epochs} epochs, "
        f"a report every {args.report_every} steps, rank 0's pixels shifted by {args.shift:g}."
    )
    plot(panels, alerts, args.out, caption)
    empty = [p.title for p in panels if not p.series]
    print(f"wrote {args.out}: {len(panels)} panels" + (f"; no data for {empty}" if empty else ""))
    return 1 if empty else 0


if __name__ == "__main__":
    raise SystemExit(main())
