"""Runtime telemetry: the metrics of `metric_names` declared with `ray.util.metrics`, plus the run's JSONL log.

The driver records everything it learns from typed results (StepOutcome, RolloutStats) in one place, so every
number on a dashboard has one writer; the reward service records its own two histograms. Ray exports them to
Prometheus with the `ray_` prefix. The JSONL log (`runs/<run_id>/events.jsonl`) holds the same facts per step,
including every skipped step and its reason, for people and tests that do not run Prometheus.
"""

from __future__ import annotations

import json
import logging
import time
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
        self.phase = rm.Histogram(M.STEP_PHASE_SECONDS, "seconds per step phase", _SECONDS_BOUNDARIES,
                                  tag_keys=("phase", "run_id"))
        g = lambda name, desc, keys=("run_id",): rm.Gauge(name, desc, tag_keys=keys)  # noqa: E731
        self.reward_mean = g(M.REWARD_MEAN, "mean reward of the step's batch")
        self.grad_norm = g(M.GRAD_NORM, "gradient norm before clipping")
        self.loss = g(M.LOSS, "learner loss")
        self.policy_version = g(M.POLICY_VERSION, "learner policy version (optimizer steps taken)")
        self.staleness = g(M.STALENESS, "learner version minus the version the cache was sampled with")
        self.residual = g(M.STRAIGHT_THROUGH_RESIDUAL, "mean |surrogate endpoint - true sample|")
        self.queue_depth = g(M.QUEUE_DEPTH, "rollout ObjectRefs in flight")
        self.sps = g(M.SAMPLES_PER_SECOND, "samples trained per second (since the run started)")
        self.eval_score = g(M.EVAL_SCORE, "evaluation score", ("run_id", "metric"))
        self.steps = rm.Counter(M.STEPS_TOTAL, "learner steps applied", tag_keys=("run_id",))
        self.skipped = rm.Counter(M.SKIPPED_STEPS_TOTAL, "learner steps skipped", tag_keys=("run_id", "reason"))
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
