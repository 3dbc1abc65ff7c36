"""FlowBP's two Grafana dashboards, built from a short spec so that layout, ids and datasources stay consistent.

`python -m k8s.render` writes them to deploy/grafana/*.json (and the chart's copies). Every query goes through the
`datasource` template variable, so the JSON imports into any Grafana with a Prometheus datasource, and the
chart's ConfigMap (label grafana_dashboard: "1") is picked up by Grafana's sidecar as is.

Runtime metrics come from ray.util.metrics and are scraped with Ray's "ray_" prefix; the controller's are
exported as named. Ray's own system metrics are listed in k8s/ray_system_metrics.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
RUN = 'run_id=~"$run_id"'
RATE = "$__rate_interval"


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""


@dataclass(frozen=True)
class Panel:
    title: str
    description: str
    queries: tuple[Query, ...]
    unit: str = "short"
    kind: str = "timeseries"  # timeseries | stat
    width: int = 8
    stacked: bool = False


@dataclass(frozen=True)
class Row:
    title: str
    description: str  # one or two sentences; deploy/README.md describes each row in these words
    panels: tuple[Panel, ...]


@dataclass(frozen=True)
class Dashboard:
    uid: str
    title: str
    description: str
    rows: tuple[Row, ...]
    run_variable: bool = True
    tags: tuple[str, ...] = field(default=("flowbp",))


def _q(expr: str, legend: str = "") -> Query:
    return Query(expr, legend)


JOB_OVERVIEW = Dashboard(
    uid="flowbp-job-overview",
    title="FlowBP / Job overview",
    description="One alignment job (or several, by run_id): reward, evaluation, speed, policy freshness, numerics.",
    rows=(
        Row(
            "Reward and evaluation",
            "Is the model getting better? Mean training reward, held-out evaluation and judge scores by metric, "
            "the loss and the gradient norm, one line per run.",
            (
                Panel("Reward (training mean)", "Mean reward of each step's batch.",
                      (_q(f"avg by (run_id) (ray_flowbp_reward_mean{{{RUN}}})", "{{run_id}}"),)),
                Panel("Evaluation and judge scores", "Held-out scores written at the eval cadence, by metric.",
                      (_q(f"avg by (run_id, metric) (ray_flowbp_eval_score{{{RUN}}})", "{{run_id}} {{metric}}"),)),
                Panel("Loss and gradient norm", "Loss of the last learner step and the gradient norm before clipping.",
                      (_q(f"avg by (run_id) (ray_flowbp_loss{{{RUN}}})", "loss {{run_id}}"),
                       _q(f"avg by (run_id) (ray_flowbp_grad_norm{{{RUN}}})", "grad norm {{run_id}}"))),
            ),
        ),
        Row(
            "Throughput and step time",
            "Where the time goes: samples per second, learner steps per minute, and the step split into its "
            "phases (rollout, transfer, surrogate, reward, backward, sync) as a mean and as a 95th percentile.",
            (
                Panel("Samples per second", "Images produced by the rollout workers per second.",
                      (_q(f"sum by (run_id) (ray_flowbp_samples_per_second{{{RUN}}})", "{{run_id}}"),),
                      unit="ops"),
                Panel("Learner steps per minute", "Completed learner steps per minute.",
                      (_q(f"sum by (run_id) (rate(ray_flowbp_steps_total{{{RUN}}}[{RATE}])) * 60", "{{run_id}}"),)),
                Panel("Mean step time by phase", "Mean seconds per step spent in each phase, stacked.",
                      (_q(f"sum by (phase) (rate(ray_flowbp_step_phase_seconds_sum{{{RUN}}}[{RATE}])) / "
                          f"sum by (phase) (rate(ray_flowbp_step_phase_seconds_count{{{RUN}}}[{RATE}]))",
                          "{{phase}}"),),
                      unit="s", stacked=True),
                Panel("Step phase p95", "95th percentile of each phase's duration.",
                      (_q(f"histogram_quantile(0.95, sum by (phase, le) "
                          f"(rate(ray_flowbp_step_phase_seconds_bucket{{{RUN}}}[{RATE}])))", "{{phase}}"),),
                      unit="s", width=24),
            ),
        ),
        Row(
            "Policy version and staleness",
            "How fresh the rollout's weights are: the learner's policy version, how many versions behind the "
            "caches being trained on are (0 in synchronous mode), and how long each weight sync takes.",
            (
                Panel("Policy version", "Version of the learner's weights; each weight sync adds one.",
                      (_q(f"max by (run_id) (ray_flowbp_policy_version{{{RUN}}})", "{{run_id}}"),)),
                Panel("Staleness", "Policy versions between the weights that sampled a cache and the learner's.",
                      (_q(f"max by (run_id) (ray_flowbp_staleness{{{RUN}}})", "{{run_id}}"),)),
                Panel("Weight sync p95", "95th percentile of a weight sync, by backend (LoRA delta or full).",
                      (_q(f"histogram_quantile(0.95, sum by (backend, le) "
                          f"(rate(ray_flowbp_weight_sync_seconds_bucket{{{RUN}}}[{RATE}])))", "{{backend}}"),),
                      unit="s"),
            ),
        ),
        Row(
            "Numerics and skipped steps",
            "Whether the gradient path can be trusted: the straight-through residual (mean distance between the "
            "surrogate endpoint and the true sample) and steps skipped for a non-finite reward, loss or gradient.",
            (
                Panel("Straight-through residual", "Mean |surrogate endpoint - true sample| of each step.",
                      (_q(f"avg by (run_id) (ray_flowbp_straight_through_residual{{{RUN}}})", "{{run_id}}"),),
                      width=12),
                Panel("Skipped steps by reason", "Steps skipped in each interval; a streak fails the run.",
                      (_q(f"sum by (run_id, reason) (increase(ray_flowbp_skipped_steps_total{{{RUN}}}[{RATE}]))",
                          "{{run_id}} {{reason}}"),),
                      width=12),
            ),
        ),
    ),
)

SYSTEM = Dashboard(
    uid="flowbp-system",
    title="FlowBP / System",
    description="The machinery under the jobs: GPUs, Ray's object store, queues, the reward service, the controller.",
    run_variable=False,
    rows=(
        Row(
            "GPUs",
            "From Ray's own node metrics: physical GPU utilisation and GPU memory per node, and how many of "
            "the cluster's GPUs Ray has handed to actors.",
            (
                Panel("GPU utilisation", "Mean physical utilisation of the GPUs on each node.",
                      (_q("avg by (instance) (ray_node_gpus_utilization)", "{{instance}}"),), unit="percent"),
                Panel("GPU memory used", "GPU memory in use and still free on each node.",
                      (_q("sum by (instance) (ray_node_gram_used)", "used {{instance}}"),
                       _q("sum by (instance) (ray_node_gram_available)", "free {{instance}}")),
                      unit="decmbytes"),
                Panel("GPUs allocated by Ray", "Logical GPUs held by actors against the cluster's total.",
                      (_q('sum(ray_resources{Name="GPU", State="USED"})', "used"),
                       _q('sum(ray_resources{Name="GPU"})', "total"))),
            ),
        ),
        Row(
            "Object store and queues",
            "Back-pressure between rollout and learner: object store bytes by location (spilling to disk is "
            "the warning sign), its fill ratio, and the driver's queue of in-flight caches.",
            (
                Panel("Object store by location", "Bytes in Ray's object store: shared memory, disk, spilled.",
                      (_q("sum by (Location) (ray_object_store_memory)", "{{Location}}"),), unit="bytes",
                      stacked=True),
                Panel("Object store fill", "Object store bytes in use over its capacity.",
                      (_q('sum(ray_object_store_memory) / sum(ray_resources{Name="object_store_memory"})', "fill"),),
                      unit="percentunit"),
                Panel("Cache queue depth", "Caches produced but not yet consumed by the learner, per run.",
                      (_q("max by (run_id) (ray_flowbp_queue_depth)", "{{run_id}}"),)),
            ),
        ),
        Row(
            "Reward service",
            "The Ray Serve reward deployments: request latency (p50, p99), requests per second and the mean "
            "batch that @serve.batch assembles, by deployment.",
            (
                Panel("Reward latency", "Median and 99th percentile time of a reward request.",
                      (_q(f"histogram_quantile(0.5, sum by (deployment, le) "
                          f"(rate(ray_flowbp_reward_request_seconds_bucket[{RATE}])))", "p50 {{deployment}}"),
                       _q(f"histogram_quantile(0.99, sum by (deployment, le) "
                          f"(rate(ray_flowbp_reward_request_seconds_bucket[{RATE}])))", "p99 {{deployment}}")),
                      unit="s"),
                Panel("Reward requests per second", "Requests answered per second.",
                      (_q(f"sum by (deployment) (rate(ray_flowbp_reward_request_seconds_count[{RATE}]))",
                          "{{deployment}}"),), unit="reqps"),
                Panel("Mean reward batch", "Mean number of samples per batched call.",
                      (_q(f"sum by (deployment) (rate(ray_flowbp_reward_batch_size_sum[{RATE}])) / "
                          f"sum by (deployment) (rate(ray_flowbp_reward_batch_size_count[{RATE}]))",
                          "{{deployment}}"),)),
            ),
        ),
        Row(
            "Controller",
            "The REST front door: requests per second by route and status code, the share of 5xx answers, "
            "p99 latency by route, jobs by state, submission failures by reason, and whether Redis and Ray "
            "are reachable.",
            (
                Panel("Requests by route and code", "Requests per second.",
                      (_q(f"sum by (route, code) (rate(flowbp_controller_requests_total[{RATE}]))",
                          "{{route}} {{code}}"),), unit="reqps"),
                # no 5xx series exists until the first 5xx: `or vector(0)` shows a healthy 0 instead of no data
                Panel("5xx share", "Share of answers with a 5xx status.",
                      (_q(f'(sum(rate(flowbp_controller_requests_total{{code=~"5.."}}[{RATE}])) or vector(0)) / '
                          f"sum(rate(flowbp_controller_requests_total[{RATE}]))", "5xx"),),
                      unit="percentunit"),
                Panel("Latency p99 by route", "99th percentile request time.",
                      (_q(f"histogram_quantile(0.99, sum by (route, le) "
                          f"(rate(flowbp_controller_request_seconds_bucket[{RATE}])))", "{{route}}"),), unit="s"),
                Panel("Jobs by state", "Job records in each state.",
                      (_q("sum by (state) (flowbp_controller_jobs)", "{{state}}"),), stacked=True),
                Panel("Submission failures", "Failed submissions to Ray per interval, by reason.",
                      (_q(f"sum by (reason) (increase(flowbp_controller_submission_failures_total[{RATE}]))",
                          "{{reason}}"),)),
                Panel("Redis and Ray reachable", "1 when the controller reaches Redis / the Ray job API.",
                      (_q("min(flowbp_controller_redis_up)", "Redis"), _q("min(flowbp_controller_ray_up)", "Ray")),
                      kind="stat"),
            ),
        ),
    ),
)

DASHBOARDS: dict[str, Dashboard] = {"job-overview.json": JOB_OVERVIEW, "system.json": SYSTEM}


def _panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict:
    targets = [
        {"datasource": DATASOURCE, "expr": q.expr, "legendFormat": q.legend or "__auto", "refId": chr(ord("A") + i)}
        for i, q in enumerate(panel.queries)
    ]
    body: dict = {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": 8, "w": panel.width, "x": x, "y": y},
        "targets": targets,
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
    }
    if panel.kind == "timeseries":
        body["fieldConfig"]["defaults"]["custom"] = {
            "drawStyle": "line", "lineWidth": 1, "fillOpacity": 20 if panel.stacked else 0,
            "stacking": {"mode": "normal" if panel.stacked else "none", "group": "A"},
        }
        body["options"] = {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                           "tooltip": {"mode": "multi", "sort": "desc"}}
    else:
        body["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                           "colorMode": "background", "graphMode": "none", "textMode": "auto"}
        body["fieldConfig"]["defaults"]["thresholds"] = {
            "mode": "absolute", "steps": [{"color": "red", "value": None}, {"color": "green", "value": 1}]}
    return body


def build(dashboard: Dashboard) -> dict:
    """The Grafana JSON model (schemaVersion 39) of one dashboard."""
    panels: list[dict] = []
    next_id, y = 1, 0
    for row in dashboard.rows:
        panels.append({"id": next_id, "type": "row", "title": row.title, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        next_id, y, x = next_id + 1, y + 1, 0
        for panel in row.panels:
            if x + panel.width > 24:  # wrap to the next line of the row
                x, y = 0, y + 8
            panels.append(_panel_json(panel, next_id, x, y))
            next_id, x = next_id + 1, x + panel.width
        y += 8
    templating: list[dict] = [{
        "name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
        "current": {}, "hide": 0, "refresh": 1, "options": [],
    }]
    if dashboard.run_variable:
        templating.append({
            "name": "run_id", "label": "Run", "type": "query", "datasource": DATASOURCE,
            "definition": "label_values(ray_flowbp_steps_total, run_id)",
            "query": {"query": "label_values(ray_flowbp_steps_total, run_id)", "refId": "run_id"},
            "multi": True, "includeAll": True, "allValue": ".*", "current": {}, "hide": 0, "refresh": 2,
            "sort": 1, "options": [],
        })
    return {
        "uid": dashboard.uid,
        "title": dashboard.title,
        "description": dashboard.description,
        "tags": list(dashboard.tags),
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "timezone": "browser",
        "templating": {"list": templating},
        "annotations": {"list": []},
        "links": [],
        "panels": panels,
    }


def render_all() -> dict[str, str]:
    """File name -> JSON text (sorted keys, two-space indent, trailing newline) for every dashboard."""
    return {name: json.dumps(build(d), indent=2, sort_keys=True) + "\n" for name, d in DASHBOARDS.items()}
