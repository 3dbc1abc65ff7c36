"""Typed payloads that cross process boundaries inside the runtime (driver <-> actors <-> learner ranks).

Why dataclasses and not dicts: a field renamed on one side fails loudly on the other, and each payload says what
it carries. Big tensors never ride in these: a `TrajectoryCache` travels as safetensors bytes in the object store
(its ObjectRef is wrapped in a list so that Ray does not resolve it on the way through the driver), and weights
travel as `WeightsHandle.refs` (one ObjectRef per bucket).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

PAYLOAD_VERSION = 1


@dataclass(frozen=True)
class WeightsHandle:
    """Where a published set of trainable weights lives: `refs` are ObjectRefs of safetensors byte buckets.

    `policy_version` is the learner step count the weights belong to (0 = the initial weights). `eval_only`: the
    EMA shadow at that version, published for an in-run eval; a rollout never samples with it.
    """

    backend: str
    policy_version: int
    generation: int  # learner (re)start count: a resumed learner may publish an *older* version than a worker has
    refs: tuple[Any, ...]
    nbytes: int
    n_tensors: int
    publish_seconds: float
    eval_only: bool = False


@dataclass(frozen=True)
class RolloutRequest:
    """One batch of prompts to sample at `step`, with the weights it must be sampled with."""

    step: int
    seed: int
    prompts: tuple[str, ...]
    weights: WeightsHandle | None
    total_batch: int  # the step's whole batch (this request may be one shard of it)
    version: int = PAYLOAD_VERSION


@dataclass(frozen=True)
class RolloutStats:
    """What a rollout worker says about a cache it produced (the cache itself is a separate ObjectRef)."""

    step: int
    worker: int
    pid: int
    policy_version: int
    samples: int
    nbytes: int
    rollout_seconds: float
    sync_seconds: float  # time spent applying new weights before this rollout (0 when already current)
    encode_seconds: float


@dataclass(frozen=True)
class LearnerWork:
    """The driver's offer to the learner group: the cache(s) for `step`. `cache_refs` is a list of ObjectRefs
    (one per rollout worker shard), kept in a list so that Ray hands the refs, not the bytes, to the board."""

    step: int
    cache_refs: tuple[Any, ...]
    rollout_policy_version: int
    generation: int = 0  # the learner generation whose weights sampled it; the board drops other generations'


@dataclass(frozen=True)
class StepOutcome:
    """One learner step as rank 0 saw it. Phase seconds are rank 0's own; `weights` is the published handle."""

    step: int
    generation: int
    loss: float
    reward_mean: float
    grad_norm: float
    residual: float
    skipped: bool
    skip_reason: str
    policy_version: int
    staleness: int
    samples: int
    phase_seconds: dict[str, float]
    weights: WeightsHandle | None
    checkpoint: str | None
    failed: str | None = None  # set when the learner gives up (e.g. too many non-finite steps in a row)
    eval_weights: WeightsHandle | None = None  # the EMA shadow (eval_only) when an eval is due and EMA is on


@dataclass(frozen=True)
class LearnerHello:
    """Sent by rank 0 each time the learner group (re)starts: where it resumed and with which weights."""

    generation: int
    start_step: int
    policy_version: int
    weights: WeightsHandle
    pids: tuple[int, ...]
    resumed_from: str | None


@dataclass
class RunSummary:
    """What the driver returns (and writes to runs/<run_id>/summary.json) when a run ends."""

    run_id: str
    status: str  # "finished" | "cancelled" | "failed"
    steps_done: int  # the run's progress: steps behind it, including those a resumed checkpoint holds
    policy_version: int
    losses: dict[int, float] = field(default_factory=dict)
    rewards: dict[int, float] = field(default_factory=dict)
    skipped: dict[int, str] = field(default_factory=dict)
    eval_scores: dict[int, dict[str, float]] = field(default_factory=dict)
    checkpoints: list[str] = field(default_factory=list)
    learner_generations: int = 1
    rollout_retries: int = 0
    wall_seconds: float = 0.0
    samples_per_second: float = 0.0
    phase_seconds: dict[str, float] = field(default_factory=dict)
    failure: str | None = None
