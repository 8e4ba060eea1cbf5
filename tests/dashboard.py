"""The Grafana dashboard's queries, read from deploy/grafana/dashboards/syncnorm.json with
its variables filled in, for the tests and ``scripts/render_dashboard.py``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "dashboards" / "syncnorm.json"


@dataclass(frozen=True)
class PanelQuery:
    panel: str  # the panel's title
    kind: str  # the panel's type: timeseries, stat, bargauge
    expr: str  # PromQL with the dashboard's variables filled in
    legend: str  # Grafana's legendFormat, e.g. "{{worker}}"
    instant: bool  # an instant query (the panel shows now), not a range


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panel_queries(
    run: str, rate_interval: str = "1m", dashboard: dict[str, Any] | None = None
) -> list[PanelQuery]:
    """Every panel's queries, in the dashboard's order, with ``$run`` and Grafana's
    ``$__rate_interval`` replaced."""
    dashboard = dashboard or load_dashboard()
    queries = []
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"].replace("$__rate_interval", rate_interval).replace("$run", run)
            queries.append(
                PanelQuery(panel["title"], panel["type"], expr, target.get("legendFormat", ""),
                           bool(target.get("instant", False)))
            )  # fmt: skip
    return queries


def legend(template: str, labels: dict[str, str]) -> str:
    """Grafana's ``{{label}}`` legend filled in from a series' labels."""
    for name, value in labels.items():
        template = template.replace("{{" + name + "}}", value)
    return template
