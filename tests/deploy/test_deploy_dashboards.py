"""The Grafana dashboards: well-formed models, queries through the datasource variable, a sane grid, and a
README that describes every row."""

from __future__ import annotations

import json

import pytest
from deploy_helpers import REPO

from k8s import dashboards

BOARDS = {p.name: json.loads(p.read_text()) for p in sorted((REPO / "deploy" / "grafana").glob("*.json"))}


def test_both_dashboards_exist_with_unique_uids():
    assert set(BOARDS) == {"job-overview.json", "system.json"}
    assert len({b["uid"] for b in BOARDS.values()}) == 2


@pytest.mark.parametrize("name", sorted(BOARDS))
def test_dashboard_model(name):
    board = BOARDS[name]
    assert board["schemaVersion"] >= 36 and board["title"].startswith("FlowBP / ")
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    rows = [p for p in board["panels"] if p["type"] == "row"]
    assert len(rows) >= 4
    cells: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        g = panel["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] >= 1, panel["title"]
        area = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not area & cells, f"{name}: {panel['title']} overlaps another panel"
        cells |= area
        if panel["type"] == "row":
            continue
        assert panel["type"] in {"timeseries", "stat"} and panel["title"] and panel["description"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs))
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}" and target["expr"].strip()
    # every row has panels under it before the next row
    order = [p["type"] == "row" for p in sorted(board["panels"], key=lambda p: (p["gridPos"]["y"], p["gridPos"]["x"]))]
    assert order[0] and not any(a and b for a, b in zip(order, order[1:])) and not order[-1]


def test_runs_can_be_picked_on_the_job_overview():
    variables = {v["name"]: v for v in BOARDS["job-overview.json"]["templating"]["list"]}
    assert variables["run_id"]["includeAll"] and variables["run_id"]["multi"]
    targets = [t["expr"] for p in BOARDS["job-overview.json"]["panels"] for t in p.get("targets", [])]
    assert all('run_id=~"$run_id"' in e for e in targets)


def test_files_are_the_generated_ones():
    assert {n: json.loads(t) for n, t in dashboards.render_all().items()} == BOARDS


def test_readme_describes_every_row():
    readme = (REPO / "deploy" / "README.md").read_text()
    for board in dashboards.DASHBOARDS.values():
        assert board.title in readme
        for row in board.rows:
            assert f"**{row.title}**" in readme, row.title
