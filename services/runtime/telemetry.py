"""Runtime telemetry: the metrics of `metric_names` declared with `ray.util.metrics`, plus the run's JSONL log.

The driver records everything it learns from typed results (StepOutcome, RolloutStats) in one place, so every
number on a dashboard has one writer; the reward service records its own two histograms. Ray exports them to
Prometheus with the `ray_` prefix. The JSONL log (`runs/<run_id>/events.jsonl`) holds the same facts per step,
including every skipped step and its reason, for people and tests that do not run Prometheus.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import urllib.request
from pathlib import Path

from ray.util import metrics as rm

from services.runtime import metric_names as M

log = logging.getLogger("flowbp.runtime")

# Seconds: from a tiny CPU model's milliseconds to a real backbone's minute-long rollouts.
_SECONDS_BOUNDARIES = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300]


class Telemetry:
    def __init__(self, run_id: str, log_path: Path | None = None):
        self.run_id = run_id
        self.tags = {"run_id": run_id}
        self._last: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}  # (name, tags) -> last value set
        self.phase = rm.Histogram(M.STEP_PHASE_SECONDS, "seconds per step phase", _SECONDS_BOUNDARIES,
                                  tag_keys=("phase", "run_id"))
        g = lambda name, desc, keys=("run_id",): _Kept(rm.Gauge(name, desc, tag_keys=keys), name,  # noqa: E731
                                                       self._last)
        self.reward_mean = g(M.REWARD_MEAN, "mean reward of the step's batch")
        self.grad_norm = g(M.GRAD_NORM, "gradient norm before clipping")
        self.loss = g(M.LOSS, "learner loss")
        self.policy_version = g(M.POLICY_VERSION, "learner policy version (optimizer steps taken)")
        self.staleness = g(M.STALENESS, "learner version minus the version the cache was sampled with")
        self.residual = g(M.STRAIGHT_THROUGH_RESIDUAL, "mean |surrogate endpoint - true sample|")
        self.queue_depth = g(M.QUEUE_DEPTH, "rollout ObjectRefs in flight")
        self.sps = g(M.SAMPLES_PER_SECOND, "samples trained per second (since the run started)")
        self.eval_score = g(M.EVAL_SCORE, "evaluation score", ("run_id", "metric"))
        c = lambda name, desc, keys: _Kept(rm.Counter(name, desc, tag_keys=keys), name, self._last)  # noqa: E731
        self.steps = c(M.STEPS_TOTAL, "learner steps applied", ("run_id",))
        self.skipped = c(M.SKIPPED_STEPS_TOTAL, "learner steps skipped", ("run_id", "reason"))
        self.sync = rm.Histogram(M.WEIGHT_SYNC_SECONDS, "weight publish + apply seconds", _SECONDS_BOUNDARIES,
                                 tag_keys=("run_id", "backend"))
        self.log_path = log_path
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)

    # ---- writers ---------------------------------------------------------------------------------------
    def event(self, kind: str, **fields) -> None:
        rec = {"t": time.time(), "run_id": self.run_id, "event": kind, **fields}
        if self.log_path is not None:
            with self.log_path.open("a") as f:
                f.write(json.dumps(rec, default=str) + "\n")

    def phases(self, seconds: dict[str, float]) -> None:
        for phase, s in seconds.items():
            if phase in M.PHASES:
                self.phase.observe(float(s), tags={"phase": phase, **self.tags})

    def step(self, outcome, samples_per_second: float) -> None:
        """Record one StepOutcome (applied or skipped)."""
        self.phases(outcome.phase_seconds)
        self.policy_version.set(outcome.policy_version, tags=self.tags)
        self.staleness.set(outcome.staleness, tags=self.tags)
        if outcome.skipped:
            self.skipped.inc(1, tags={**self.tags, "reason": outcome.skip_reason})
            log.warning("run %s step %d skipped: %s", self.run_id, outcome.step, outcome.skip_reason)
        else:
            self.steps.inc(1, tags=self.tags)
            self.loss.set(outcome.loss, tags=self.tags)
            self.reward_mean.set(outcome.reward_mean, tags=self.tags)
            self.grad_norm.set(outcome.grad_norm, tags=self.tags)
            self.residual.set(outcome.residual, tags=self.tags)
            self.sps.set(samples_per_second, tags=self.tags)
        self.event("step", step=outcome.step, generation=outcome.generation, loss=outcome.loss,
                   reward_mean=outcome.reward_mean, grad_norm=outcome.grad_norm, residual=outcome.residual,
                   skipped=outcome.skipped, skip_reason=outcome.skip_reason, policy_version=outcome.policy_version,
                   staleness=outcome.staleness, phase_seconds=outcome.phase_seconds, checkpoint=outcome.checkpoint,
                   fetched_bytes=list(outcome.fetched_bytes))

    def weight_sync(self, backend: str, seconds: float) -> None:
        self.sync.observe(float(seconds), tags={**self.tags, "backend": backend})

    def queue(self, depth: int) -> None:
        self.queue_depth.set(depth, tags=self.tags)

    def eval(self, step: int, scores: dict[str, float]) -> None:
        for k, v in scores.items():
            self.eval_score.set(float(v), tags={**self.tags, "metric": k})
        self.event("eval", step=step, scores=scores)

    # ---- before the process exits --------------------------------------------------------------------
    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until this node's metrics exporter shows the last value of every gauge and counter this run set.

        A process that exits right after setting a gauge (a run's final eval score) would take the value along:
        Ray exports a process's metrics every `RAY_metrics_report_interval_ms` (10 s by default). True once every
        value is there; False, logged, when the exporter cannot be read or `timeout_s` passes first.
        """
        interval_s = max(float(os.environ.get("RAY_metrics_report_interval_ms", "10000")), 1000.0) / 1000.0
        timeout_s = 3 * interval_s + 10.0 if timeout_s is None else timeout_s
        if not self._last:
            return True
        url = _metrics_export_url()
        if url is None:
            return _gave_up("Ray names no metrics export port for this node")
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    exported = _gauge_samples(r.read().decode())
            except OSError as e:
                return _gave_up(f"{url}: {e}")
            missing = [k for k, v in self._last.items() if not _shown(exported, k, v)]
            if not missing or time.monotonic() > deadline:
                break
            time.sleep(0.25)
        if missing:
            return _gave_up(f"after {timeout_s:.0f}s {url} still lacks the last value of {sorted(missing)[:3]}")
        return True


class _Kept:
    """A `ray.util.metrics` Gauge or Counter that remembers the value each tag set should export (for `flush`)."""

    def __init__(self, metric, name: str, last: dict):
        self.metric, self.name, self.last = metric, name, last

    def set(self, value: float, tags: dict[str, str]) -> None:
        self.metric.set(value, tags=tags)
        self.last[(self.name, tuple(sorted(tags.items())))] = float(value)

    def inc(self, value: float, tags: dict[str, str]) -> None:
        self.metric.inc(value, tags=tags)
        key = (self.name, tuple(sorted(tags.items())))
        self.last[key] = self.last.get(key, 0.0) + float(value)


def _metrics_export_url() -> str | None:
    """The Prometheus endpoint of the Ray node this process runs on, or None when Ray does not say."""
    import ray

    try:
        node_id, nodes = ray.get_runtime_context().get_node_id(), ray.nodes()
    except Exception as e:  # noqa: BLE001 - the cluster went away with the run; nothing left to flush to
        log.warning("cannot ask Ray for this node's metrics port: %s", e)
        return None
    for node in nodes:
        if node.get("NodeID") == node_id and node.get("MetricsExportPort"):
            return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    return None


def _gauge_samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    from prometheus_client.parser import text_string_to_metric_families

    return [(s.name, s.labels, s.value) for fam in text_string_to_metric_families(text) for s in fam.samples]


def _shown(exported: list[tuple[str, dict[str, str], float]], key: tuple, value: float) -> bool:
    """Whether a sample of `ray_<name>` carries the tags and the value (Ray adds labels of its own)."""
    name, tags = key
    return any(n == f"ray_{name}" and all(labels.get(k) == v for k, v in tags) and
               (math.isclose(got, value, rel_tol=1e-6, abs_tol=1e-9) or (math.isnan(got) and math.isnan(value)))
               for n, labels, got in exported)


def _gave_up(why: str) -> bool:
    log.warning("the run's last metric values may not reach Prometheus: %s", why)
    return False
