"""A real Prometheus answers every dashboard panel and every alert expression from a scraped run.

Debian's `prometheus` scrapes, every second, the controller's /metrics (with the API token as a bearer credential,
as the chart's ServiceMonitor sends it) and the local Ray head's metrics export port, while a short embedded job
runs through the pieces `make serve` starts (real Redis, the uvicorn controller, a local Ray head) and is submitted
with `flowbp submit`. Every panel target of deploy/grafana and every alert expression of deploy/prometheus (walked
from the files) is then asked of Prometheus' HTTP API with the Grafana variables filled in: each must answer with
a finite value. The queries that need something to go wrong are in EVENTS: the test stops Ray, Redis and the
controller (each by its pid) and sees them answer, or the table says why it cannot.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml
from deploy_helpers import ALERT_RULES, REPO, alert_exprs, panel_targets, template_queries

from services.localproc import LOOPBACK, RayHead, RedisServer, free_port, stop_process
from tests.controller.controller_helpers import TOKEN, ControllerProcess, controller_env

pytestmark = [pytest.mark.integration, pytest.mark.slow,
              pytest.mark.skipif(shutil.which("prometheus") is None,
                                 reason="prometheus not installed (make setup installs Debian's prometheus package)")]

SCRAPE_INTERVAL = "1s"
# Grafana's $__rate_interval with Prometheus' default 15 s scrape interval (4 x 15 s); it also spans the run's steps
RATE_INTERVAL = "1m"
# The embedded run config made as short as it allows while every runtime metric is still written: two reward
# deployments (train and eval), six steps (a rate needs two changes a scrape apart: on a quiet machine three steps
# fitted between two of the reward replica's exports), an eval at the end.
SHRINK = ["train.steps=6", "train.batch_size=2", "sampling.n_steps=4", "method.k=2", "runtime.rollout_workers=1",
          "runtime.mode=sync", "runtime.max_staleness=0", "checkpoint.every=6", "eval.every=6", "eval.limit=2"]
RUN_DEADLINE_S = 900  # submit to success; about 5 minutes on this project's loaded 2-core machine
EVENT_DEADLINE_S = 120  # a fault to its series answering (scrapes every second, the reconciler ticks every second)

RAY_DOWN, REDIS_DOWN, CONTROLLER_DOWN = "Ray stopped", "Redis stopped", "controller stopped"
FAULTS = (RAY_DOWN, REDIS_DOWN, CONTROLLER_DOWN)  # made in this order after the run


@dataclass(frozen=True, kw_only=True)
class Event:
    """What a query needs before it can answer, and whether this test brings it about.

    Attributes:
        why (str): the event the query waits for.
        fault (str | None): one of FAULTS, made by the test after the run; None when it cannot be made here
            (`why` then also says why not).
        operands (tuple[str, ...]): parts of the expression, verbatim, that must answer on the healthy run, so an
            alert whose event cannot be made is still known to read live series.
    """

    why: str
    fault: str | None = None
    operands: tuple[str, ...] = ()


NO_GPU = Event(why="a GPU node: the local head starts with --num-gpus=0 and Ray exports GPU series only for GPUs")
NO_NAN_SOURCE = ("no run config can make one: every number is finite-checked at submit and the controller runs "
                 "only registered rewards (tests/runtime/test_ray_runtime.py poisons a run in-process instead)")

# Reviewed: every query that does not answer on a healthy CPU run, and why. Keys are "<file> / <panel> / <refId>"
# for panels and the alert name for rules; a key that names nothing shipped fails the test.
EVENTS: dict[str, Event] = {
    "job-overview.json / Skipped steps by reason / A": Event(
        why=f"a skipped step (non-finite reward, loss or gradient); {NO_NAN_SOURCE}"),
    "system.json / GPU utilisation / A": NO_GPU,
    "system.json / GPU memory used / A": NO_GPU,
    "system.json / GPU memory used / B": NO_GPU,
    "system.json / GPUs allocated by Ray / A": NO_GPU,
    "system.json / GPUs allocated by Ray / B": NO_GPU,
    "system.json / Submission failures / A": Event(why="a failed submission: a job submitted while Ray is down",
                                                   fault=RAY_DOWN),
    "FlowBPJobStalled": Event(
        why="a running job with no learner step for 15 minutes: longer than a test may wait",
        operands=("sum by (run_id) (increase(ray_flowbp_steps_total[15m]))",
                  'sum(flowbp_controller_jobs{state="running"})')),
    "FlowBPRewardNaNStreak": Event(
        why=f"steps skipped for a non-finite reward; {NO_NAN_SOURCE}",
        operands=("sum by (run_id) (increase(ray_flowbp_steps_total[10m]))",)),
    "FlowBPStalenessOverLimit": Event(
        why="caches more than 4 policy versions old: sync mode trains on staleness 0 and async mode stays within "
            "runtime.max_staleness (at most 100, so only a config allowing it could get there)",
        operands=("max by (run_id) (ray_flowbp_staleness)",)),
    "FlowBPRayAPIUnreachable": Event(why="the Ray job API unreachable", fault=RAY_DOWN),
    "FlowBPRedisDown": Event(why="Redis unreachable", fault=REDIS_DOWN),
    "FlowBPControllerHigh5xxRate": Event(why="over 5% of answers 5xx: API calls while Redis is down get 503",
                                         fault=REDIS_DOWN),
    "FlowBPControllerScrapeDown": Event(why="the controller's /metrics failing to scrape", fault=CONTROLLER_DOWN),
}


# Reviewed: panels whose every finite value must also lie in a range (lowest, highest; None: unbounded).
BOUNDS: dict[str, tuple[float | None, float | None]] = {
    "system.json / Mean reward batch / A": (1.0, None),  # a batch holds at least one request
    "system.json / 5xx share / A": (0.0, 1.0),
    "system.json / Object store fill / A": (0.0, 1.0),
    "job-overview.json / Staleness / A": (0.0, 0.0),  # the run is in sync mode
}


@dataclass
class PrometheusServer:
    """Debian's prometheus on a loopback port, its TSDB in `data_dir`, stopped by its pid."""

    config: Path
    data_dir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self, log: Path, timeout: float = 60.0) -> "PrometheusServer":
        cmd = [shutil.which("prometheus"), f"--config.file={self.config}", f"--storage.tsdb.path={self.data_dir}",
               f"--web.listen-address={LOOPBACK}:{self.port}"]
        self.proc = subprocess.Popen(cmd, stdout=log.open("ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"prometheus on {self.url} was not ready within {timeout:.0f}s:\n{log.read_text()[-3000:]}")

    def api(self, path: str, **params) -> dict | list:
        r = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=30)
        body = r.json()
        assert body["status"] == "success", f"/api/v1/{path} {params}: {body.get('error')}"
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def query_range(self, expr: str, since: float) -> list[dict]:
        """`expr` at every scrape from `since` (epoch seconds) to now, as a Grafana time-series panel asks it."""
        return self.api("query_range", query=expr, start=f"{since:.3f}", end=f"{time.time():.3f}",
                        step=SCRAPE_INTERVAL)["result"]

    def stop(self) -> None:
        stop_process(self.proc, timeout=30)
        self.proc = None


def scrape_config(*, controller_port: int, ray_metrics_port: int, token_file: Path) -> dict:
    return {
        "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
        "rule_files": [str(ALERT_RULES)],
        "scrape_configs": [
            # what the chart's ServiceMonitor becomes: job "flowbp-controller", the api-token as a bearer credential
            {"job_name": "flowbp-controller", "metrics_path": "/metrics",
             "authorization": {"type": "Bearer", "credentials_file": str(token_file)},
             "static_configs": [{"targets": [f"{LOOPBACK}:{controller_port}"]}]},
            # what the PodMonitor scrapes on every Ray pod: Ray's system metrics and FlowBP's ray.util.metrics
            {"job_name": "ray", "static_configs": [{"targets": [f"{LOOPBACK}:{ray_metrics_port}"]}]},
        ],
    }


def shipped_queries() -> dict[str, str]:
    """Key -> PromQL for every panel target and alert rule, as shipped."""
    queries = dict(panel_targets())
    for name, expr in alert_exprs():
        assert name not in queries
        queries[name] = expr
    return queries


def fill(expr: str, variables: dict[str, str]) -> str:
    """`expr` with its Grafana variables ($name, ${name}) replaced; a variable without a value fails, named."""
    unknown = sorted({m for m in re.findall(r"\$\{?(\w+)\}?", expr) if m not in variables})
    assert not unknown, f"{expr!r}: no value for the Grafana variable(s) {unknown}; give them one in this test"
    return re.sub(r"\$\{?(\w+)\}?", lambda m: variables[m.group(1)], expr)


def finite_values(result: list[dict]) -> list[float]:
    """The finite sample values of an instant or range query's result (empty when it has none: no series, or all
    NaN)."""
    samples = [s for series in result for s in (series["values"] if "values" in series else [series["value"]])]
    return [v for v in (float(value) for _, value in samples) if math.isfinite(v)]


def out_of_bounds(values: list[float], bounds: tuple[float | None, float | None]) -> list[float]:
    low, high = bounds
    return [v for v in values if (low is not None and v < low) or (high is not None and v > high)]


class Answers:
    """Which queries have answered with a finite value at some scrape since `since`, asked until a deadline.

    Range queries, as the panels ask them: a gauge a finished process set last (the run's final eval score) lives
    in Ray's exporter for two export intervals only, and an instant query after its staleness marker sees nothing.
    """

    def __init__(self, prom: PrometheusServer, queries: dict[str, str], since: float):
        self.prom = prom
        self.since = since
        self.pending = dict(queries)
        self.wrong: list[str] = []  # answers outside their BOUNDS

    def sweep(self) -> None:
        for key, expr in list(self.pending.items()):
            values = finite_values(self.prom.query_range(expr, self.since))
            if values:
                del self.pending[key]
                bad = out_of_bounds(values, BOUNDS.get(key, (None, None)))
                if bad:
                    self.wrong.append(f"{key}: `{expr}` answered {bad}, outside {BOUNDS[key]}")

    def wait(self, timeout: float, poke=lambda: None) -> None:
        deadline = time.monotonic() + timeout
        while self.pending and time.monotonic() < deadline:
            poke()
            self.sweep()
            time.sleep(1.0)

    def problems(self, what: str) -> list[str]:
        return self.wrong + [f"{key}: `{expr}` returned no finite value {what}" for key, expr in self.pending.items()]


def flowbp(url: str, *args: str) -> str:
    """The `flowbp` CLI as a user runs it (address and token from the environment); its stdout."""
    env = {**os.environ, "FLOWBP_URL": url, "FLOWBP_TOKEN": TOKEN, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "services.controller.cli", *args], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"flowbp {' '.join(args)} exited {out.returncode}:\n{out.stdout}\n{out.stderr}"
    return out.stdout


def test_the_event_table_names_shipped_queries_and_real_parts_of_them():
    queries = shipped_queries()
    assert len(queries) >= 30  # the walk found the panels and the rules
    assert set(EVENTS) | set(BOUNDS) <= set(queries), (set(EVENTS) | set(BOUNDS)) - set(queries)
    for key, event in EVENTS.items():
        assert event.fault in (None, *FAULTS), key
        for part in event.operands:
            assert part in queries[key], f"{key}: operand {part!r} is not in `{queries[key]}`"


def test_fill_finite_values_and_bounds():
    assert fill('x{run_id=~"$run_id"}[$__rate_interval]', {"run_id": "r", "__rate_interval": "1m"}) == \
        'x{run_id=~"r"}[1m]'
    with pytest.raises(AssertionError, match=r"\['node'\]"):
        fill('x{instance=~"${node}"}', {})
    assert finite_values([{"metric": {}, "value": [0, "NaN"]}, {"metric": {}, "value": [0, "+Inf"]}]) == []
    assert finite_values([]) == [] and finite_values([{"metric": {}, "value": [0, "0.5"]}]) == [0.5]
    assert finite_values([{"metric": {}, "values": [[0, "NaN"], [1, "2"]]}, {"metric": {}, "values": [[1, "3"]]}]) \
        == [2.0, 3.0]
    assert out_of_bounds([0.5, 1.0, 3.0], (1.0, None)) == [0.5] and out_of_bounds([2.0], (0.0, 1.0)) == [2.0]


def test_prometheus_answers_every_panel_and_alert(tmp_path):
    queries = shipped_queries()
    data = {k: q for k, q in queries.items() if k not in EVENTS}
    alerts = {name for name, _ in alert_exprs()}
    problems: list[str] = []

    redis = RedisServer(data_dir=tmp_path / "redis").start()
    ray = ctl = prom = None
    stack = contextlib.ExitStack()
    try:
        # every process exports its metrics each second (Ray's default is 10 s), so a step's histogram change
        # reaches a scrape before the next step's, however the load spaces the steps
        ray = RayHead(num_cpus=4, object_store_mb=200, env={"RAY_metrics_report_interval_ms": "1000"}).start()
        env = controller_env(redis.url, ray.dashboard_url, tmp_path,
                             FLOWBP_ENTRYPOINT=f"{shlex.quote(sys.executable)} -m services.entrypoints.train",
                             FLOWBP_CHECK_REGISTRIES="true", FLOWBP_RECONCILE_INTERVAL_S="1.0",
                             FLOWBP_RUNTIME_ENV='{"env_vars": {"PYTHONPATH": "%s"}}' % REPO)
        ctl = ControllerProcess(env, tmp_path / "controller.log").start()
        token = tmp_path / "api-token"
        token.write_text(TOKEN)
        config = tmp_path / "prometheus.yml"
        config.write_text(yaml.safe_dump(scrape_config(controller_port=ctl.port,
                                                       ray_metrics_port=ray.metrics_export_port, token_file=token)))
        prom = PrometheusServer(config, tmp_path / "tsdb").start(tmp_path / "prometheus.log")

        # -- the healthy run: every data query and every operand answers while the job runs --
        sets = [a for s in SHRINK for a in ("--set", s)]
        submitted = time.time()
        job = flowbp(ctl.url, "submit", str(REPO / "deploy" / "configs" / "embedded.yaml"), *sets).split()[0]
        api = stack.enter_context(ctl.client())
        run_id = api.get(f"/v1/jobs/{job}").json()["run_id"]
        variables = {"run_id": run_id, "__rate_interval": RATE_INTERVAL}
        pending = {k: fill(q, variables) for k, q in data.items()}
        pending |= {f"{k} (operand {i})": part for k, e in EVENTS.items() for i, part in enumerate(e.operands)}
        healthy = Answers(prom, pending, since=submitted)
        picks = {f"{board} ${name}": query for board, name, query in template_queries()}
        picked: dict[str, list[str]] = {}
        deadline = time.monotonic() + RUN_DEADLINE_S
        state = "pending"
        while state not in ("succeeded", "failed", "cancelled"):
            assert time.monotonic() < deadline, \
                f"job {job} still {state} after {RUN_DEADLINE_S}s; not answered yet: {sorted(healthy.pending)}"
            state = api.get(f"/v1/jobs/{job}").json()["state"]
            healthy.sweep()
            for where, query in picks.items():  # the variable's own query, as Grafana asks it
                metric, label = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", query).groups()
                picked[where] = prom.api(f"label/{label}/values", **{"match[]": metric})
            time.sleep(2.0)
        logs = api.get(f"/v1/jobs/{job}/logs", params={"tail": 40}).json()["text"]
        assert state == "succeeded", f"job {job} {state}:\n{logs}"
        healthy.wait(20)  # counters and histograms outlive the run by a few scrapes
        problems += healthy.problems("during the run")
        problems += [f"{where}: the job's run {run_id!r} is not among {vals}" for where, vals in picked.items()
                     if run_id not in vals]
        firing = {name: prom.query(queries[name]) for name in alerts}
        problems += [f"{name} answers on a healthy run: {res[:2]}" for name, res in firing.items() if res]
        problems += [f"rule {r['name']}: health {r['health']} {r.get('lastError', '')}"
                     for g in prom.api("rules")["groups"] for r in g["rules"] if r["health"] != "ok"]

        # -- the faults, one after the other: each event query answers after its own --
        for fault in FAULTS:
            waiting = Answers(prom, {k: fill(queries[k], variables) for k, e in EVENTS.items() if e.fault == fault},
                              since=time.time())
            poke = lambda: None  # noqa: E731
            if fault == RAY_DOWN:
                ray.stop()  # by the pids of our head only
                probe = flowbp(ctl.url, "submit", str(REPO / "deploy" / "configs" / "embedded.yaml"),
                               "--set", "run_id=ray-down-probe", *sets).split()[0]
                assert api.get(f"/v1/jobs/{probe}").json()["state"] == "pending"
            elif fault == REDIS_DOWN:
                redis.stop()  # SIGTERM to our redis-server's pid
                codes: list[int] = []
                poke = lambda: codes.extend(api.get("/v1/jobs").status_code for _ in range(5))  # noqa: E731
            else:
                ctl.stop()
            waiting.wait(EVENT_DEADLINE_S, poke)
            problems += waiting.problems(f"within {EVENT_DEADLINE_S}s of: {fault}")
            if fault == REDIS_DOWN:
                assert codes and set(codes) == {503}, f"API calls with Redis down answered {sorted(set(codes))}"
        assert not problems, "\n".join(problems)
    finally:
        stack.close()
        for server in (prom, ctl, ray):
            if server is not None:
                server.stop()
        redis.cleanup()
