"""Every metric a dashboard panel or an alert rule reads is one our code exports (or an allow-listed Ray system
metric), and every metric our code exports is on some panel."""

from __future__ import annotations

import re
from importlib.util import find_spec
from pathlib import Path

import pytest
from deploy_helpers import DASHBOARDS, REPO, alert_exprs, panel_targets, template_queries

from k8s import ray_system_metrics
from k8s.promql import metric_names
from services.controller import metric_names as controller_names
from services.runtime import metric_names as runtime_names

# Series Prometheus writes itself for every scrape target.
PROMETHEUS_SERIES = {"up"}
SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "gauge": ("",), "counter": ("",)}


def declared_types() -> dict[str, str]:
    """Metric name -> histogram | gauge | counter, from the contract (docs/interfaces.md, "Metric names")."""
    text = (REPO / "docs" / "interfaces.md").read_text()
    section = text[text.index("## Metric names"):]
    return dict(re.findall(r"`(flowbp_[a-z0-9_]+)` (histogram|gauge|counter)", section))


def exported_series() -> dict[str, str]:
    """Every Prometheus series name our code exports -> the declared metric it belongs to."""
    types = declared_types()
    out = {}
    for prefix, module in ((runtime_names.PROMETHEUS_PREFIX, runtime_names), ("", controller_names)):
        for name in module.ALL:
            for suffix in SUFFIXES[types[name]]:
                out[prefix + name + suffix] = name
    return out


def dashboard_queries() -> dict[str, list[str]]:
    """Dashboard file -> every PromQL string in it (panel targets and template-variable queries)."""
    out: dict[str, list[str]] = {p.name: [] for p in sorted(DASHBOARDS.glob("*.json"))}
    for where, expr in panel_targets():
        out[where.split(" / ")[0]].append(expr)
    for board, _, query in template_queries():
        out[board].append(re.sub(r"^label_values\((.*),[^,]*\)$", r"\1", query))
    return out


def rule_queries() -> list[str]:
    return [expr for _, expr in alert_exprs()]


def test_the_contract_and_the_modules_list_the_same_metrics():
    types = declared_types()
    assert set(types) == set(runtime_names.ALL) | set(controller_names.ALL)
    assert len(runtime_names.ALL) == len(set(runtime_names.ALL)) == 15
    assert len(controller_names.ALL) == len(set(controller_names.ALL)) == 6
    # Counters end in _total: both exporters then expose exactly that name (prometheus-client strips and
    # re-adds the suffix), so the dashboards can query the declared name.
    for name, kind in types.items():
        assert (kind == "counter") == name.endswith("_total"), name


def test_controller_registry_exports_the_declared_series():
    """The real prometheus-client registry of the controller (Redis-backed jobs gauge aside) agrees."""
    from services.controller.metrics import ControllerMetrics

    metrics = ControllerMetrics()
    metrics.observe_request("/v1/jobs", "GET", 200, 0.01)
    metrics.submission_failures.labels(reason="ray_unreachable").inc()
    samples = {s.name for family in metrics.registry.collect() for s in family.samples}
    expected = {series for series, name in exported_series().items()
                if name in controller_names.ALL and name != controller_names.JOBS}
    assert expected <= samples, expected - samples


def test_every_queried_metric_is_exported():
    allowed = set(exported_series()) | set(ray_system_metrics.ALL) | PROMETHEUS_SERIES
    queries = [(f"deploy/grafana/{name}", q) for name, qs in dashboard_queries().items() for q in qs]
    queries += [("deploy/prometheus/flowbp-alerts.yaml", q) for q in rule_queries()]
    assert len(queries) >= 30  # the collection itself found the panels and rules
    unknown = [(where, name) for where, q in queries for name in metric_names(q) if name not in allowed]
    assert unknown == []


def test_every_exported_metric_is_on_a_panel():
    series = exported_series()
    on_panels = {series[n] for qs in dashboard_queries().values() for q in qs for n in metric_names(q) if n in series}
    missing = set(runtime_names.ALL) | set(controller_names.ALL)
    assert missing - on_panels == set()


def test_the_check_catches_a_renamed_metric():
    allowed = set(exported_series()) | set(ray_system_metrics.ALL)
    query = 'avg by (run_id) (ray_flowbp_reward_average{run_id=~"$run_id"})'
    assert metric_names(query) - allowed == {"ray_flowbp_reward_average"}
    # a histogram's own name is not a series: only its _bucket/_sum/_count are
    assert "ray_flowbp_step_phase_seconds" not in allowed and "ray_flowbp_reward_mean_bucket" not in allowed


def test_ray_system_metrics_are_ones_ray_itself_charts():
    """Ray 2.60's own Grafana panels (shipped in the wheel) use each allow-listed name: a rename in Ray fails here."""
    spec = find_spec("ray")
    dashboards = Path(spec.origin).parent / "dashboard" / "modules" / "metrics" / "dashboards"
    panels = dashboards / "default_dashboard_panels.py"
    text = panels.read_text()
    for name in ray_system_metrics.ALL:
        assert re.search(rf"\b{name}\b", text), name


@pytest.mark.parametrize("expr, names", [
    ('histogram_quantile(0.95, sum by (phase, le) (rate(ray_flowbp_step_phase_seconds_bucket{run_id=~"$run_id"}'
     '[$__rate_interval])))', {"ray_flowbp_step_phase_seconds_bucket"}),
    ('sum(rate(flowbp_controller_requests_total{code=~"5.."}[5m])) / sum(rate(flowbp_controller_requests_total[5m]))'
     ' > 0.05', {"flowbp_controller_requests_total"}),
    ("(a_total == 0) and on () (sum(b{state=\"running\"}) > 0)", {"a_total", "b"}),
    ("x unless on (run_id) (sum by (run_id) (increase(y[10m])) > 0)", {"x", "y"}),
    ("sum without (instance) (up offset 5m) * 1e3", {"up"}),
    ('label_replace(m, "dst", "$1", "src", "(.*)")', {"m"}),
])
def test_promql_metric_names(expr, names):
    assert metric_names(expr) == names
