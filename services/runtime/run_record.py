"""What a run has learned so far: the per-step outcomes, the `RunSummary` built from them, phase timings, and the
telemetry they feed. The driver's loop decides; this records, so that every reported number has one writer.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from services.runtime.payloads import LearnerHello, RunSummary, StepOutcome
from services.runtime.telemetry import Telemetry


@dataclass
class _Counters:
    rollout_pids: dict[int, set] = field(default_factory=dict)
    phase_totals: dict[str, float] = field(default_factory=dict)
    phase_counts: dict[str, int] = field(default_factory=dict)

    def add_phase(self, name: str, seconds: float) -> None:
        self.phase_totals[name] = self.phase_totals.get(name, 0.0) + float(seconds)
        self.phase_counts[name] = self.phase_counts.get(name, 0) + 1

    def means(self) -> dict[str, float]:
        return {k: self.phase_totals[k] / self.phase_counts[k] for k in self.phase_totals}


class RunRecord:
    """The outcomes of one run (by step), its summary and its telemetry (metrics and `events.jsonl`).

    `outcomes` and `summary` are the objects the driver exposes: tests and the demo read them while it runs.
    """

    def __init__(self, run_id: str, run_dir: Path, weight_sync_backend: str):
        self.run_dir = run_dir
        self.backend = weight_sync_backend
        self.telemetry = Telemetry(run_id, run_dir / "events.jsonl")
        self.summary = RunSummary(run_id=run_id, status="running", steps_done=0, policy_version=0)
        self.counters = _Counters()
        self.outcomes: dict[int, StepOutcome] = {}
        self.hello: LearnerHello | None = None  # the learner generation the run follows

    def rollout(self, stats) -> None:
        """The stats of every shard of one step's rollout."""
        for s in stats:
            self.counters.rollout_pids.setdefault(s.worker, set()).add(s.pid)
            if s.sync_seconds > 0:
                self.telemetry.weight_sync(self.backend, s.sync_seconds)
        self.counters.add_phase("rollout", max(s.rollout_seconds for s in stats))
        self.telemetry.phases({"rollout": max(s.rollout_seconds for s in stats)})

    def outcome(self, o: StepOutcome, sps: float) -> None:
        """A learner step's outcome; only the newest weights are kept (a held handle pins that version's bytes)."""
        self.outcomes[o.step] = replace(o, weights=None, eval_weights=None)
        self.telemetry.step(o, sps)
        for k, v in o.phase_seconds.items():
            self.counters.add_phase(k, v)
        if o.weights is not None:
            self.telemetry.weight_sync(o.weights.backend, o.weights.publish_seconds)
        self._sync_summary()

    def rewind(self, hello: LearnerHello) -> None:
        """A learner generation starts at `hello.start_step`: forget the outcomes it redoes."""
        self.hello = hello
        self.summary.learner_generations = hello.generation
        for s in [s for s in self.outcomes if s >= hello.start_step]:
            del self.outcomes[s]
        self._sync_summary()

    def evaluation(self, step: int, result: dict[str, float]) -> None:
        self.summary.eval_scores[step] = result
        self.telemetry.eval(step, result)

    def fail(self, reason: str) -> None:
        self.summary.status = "failed"
        self.summary.failure = self.summary.failure or reason
        self.telemetry.event("failed", reason=self.summary.failure)

    def finish(self, wall_seconds: float) -> None:
        """Close the summary, write `summary.json` and the end event."""
        s = self.summary
        s.wall_seconds = wall_seconds
        s.phase_seconds = self.counters.means()
        s.rollout_retries = sum(max(0, len(p) - 1) for p in self.counters.rollout_pids.values())
        (self.run_dir / "summary.json").write_text(json.dumps(asdict(s), indent=2, default=str))
        self.telemetry.event("end", status=s.status, steps_done=s.steps_done)

    def _sync_summary(self) -> None:
        s = self.summary
        s.losses = {k: o.loss for k, o in sorted(self.outcomes.items()) if not o.skipped}
        s.rewards = {k: o.reward_mean for k, o in sorted(self.outcomes.items()) if not o.skipped}
        s.skipped = {k: o.skip_reason for k, o in sorted(self.outcomes.items()) if o.skipped}
        # Progress of the run (a resumed run counts the steps its checkpoint already holds).
        start = self.hello.start_step if self.hello is not None else 0
        s.steps_done = max(self.outcomes, default=start - 1) + 1
        s.policy_version = max((o.policy_version for o in self.outcomes.values()), default=s.policy_version)
        s.checkpoints = sorted({o.checkpoint for o in self.outcomes.values() if o.checkpoint})
