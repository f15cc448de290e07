"""The Grafana dashboard is provisioning-ready and shows what issue 5 lists.

Whether each panel's PromQL returns data is test_observability_live.py's job;
this file checks the JSON itself, without a Grafana.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.deploy.conftest import DEPLOY

GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "tfshield-dashboard.json"
PANEL_TYPES = {"row", "stat", "timeseries", "heatmap"}
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def test_dashboard_is_provisioning_ready(dashboard: dict[str, Any]) -> None:
    # A fixed uid keeps links stable; no numeric id, Grafana assigns one on import.
    assert dashboard["uid"] == "tfshield" and "id" not in dashboard
    assert "__inputs" not in dashboard, "provisioning does not resolve import-time inputs"
    assert dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("namespace", "job", "model", "detector"):
        assert variables[name]["includeAll"] and variables[name]["allValue"] == ".*"
        assert variables[name]["datasource"] == DATASOURCE


def test_every_panel_uses_the_chosen_prometheus(dashboard: dict[str, Any]) -> None:
    for panel in panels(dashboard):
        assert panel["type"] in PANEL_TYPES, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["description"].strip(), panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE and target["expr"].strip(), panel["title"]
            if "$job" not in target["expr"] and "tfshield" in target["expr"]:
                pytest.fail(f"{panel['title']}: query ignores the namespace/job selection")


def test_panels_have_unique_ids_and_do_not_overlap(dashboard: dict[str, Any]) -> None:
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}
    for panel in panels(dashboard):
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_dashboard_shows_what_issue_5_asks_for(dashboard: dict[str, Any]) -> None:
    reads: dict[str, list[str]] = {}
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            reads.setdefault(panel["title"], []).append(target["expr"])

    def shown(metric: str, by: str = "") -> list[str]:
        return [t for t, exprs in reads.items() if any(metric in e and by in e for e in exprs)]

    assert shown("tfshield_requests_total", "by (model, code)")  # traffic by model and code
    added = shown("tfshield_upstream_duration_seconds_bucket")  # added latency percentiles
    assert any("tfshield_request_duration_seconds_bucket" in e for t in added for e in reads[t])
    assert shown("tfshield_decisions_total", "by (action)")  # decisions by action
    assert shown("tfshield_detector_flags_total")  # detector flags
    heatmaps = {p["title"]: p for p in panels(dashboard) if p["type"] == "heatmap"}
    # Detector score distributions and the client-risk histogram.
    for metric in ("tfshield_detector_score_bucket", "tfshield_client_risk_bucket"):
        assert any(metric in e for t in heatmaps for e in reads[t]), metric
    for panel in heatmaps.values():
        assert all(t["format"] == "heatmap" for t in panel["targets"]) and not panel["options"]["calculate"]
    assert shown("tfshield_store_errors_total") and shown("tfshield_store_operation_duration_seconds")


def test_provisioning_files_point_at_the_dashboard() -> None:
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "tfshield.yaml").read_text())
    (entry,) = provider["providers"]
    assert entry["type"] == "file" and entry["options"]["path"].endswith("/tfshield")
    datasources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    assert [d["type"] for d in datasources["datasources"]] == ["prometheus"]
