"""Typed payloads that cross process boundaries inside the runtime (driver <-> actors <-> learner ranks).

Why dataclasses and not dicts: a field renamed on one side fails loudly on the other, and each payload says what
it carries. Big tensors never ride in these: a `TrajectoryCache` travels as safetensors bytes in the object store,
in one piece per learner rank a shard covers (the ObjectRefs sit in tuples, so that Ray does not resolve them on the
way through the driver and the board), and weights
travel as `WeightsHandle.refs` (a LoRA adapter's one blob) or are read bucket by bucket from the server a
`WeightsHandle.stream` names (full fine-tuning), or broadcast from learner rank 0 (`collective`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flowbp_core.plan import Plan

PAYLOAD_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class BucketStream:
    """Where a `full_state` publish's buckets wait to be read: a `WeightServer` actor's memory, not the store.

    Attributes:
        server (ActorHandle): the `weight_sync.WeightServer` on learner rank 0's node holding the buckets.
        key (int): the publish's number at that server (one per publish, live or eval-only).
        n_buckets (int): how many buckets to read, in order 0..n_buckets-1.
        in_flight (int): how many buckets a reader may have in the object store at once.
    """

    server: Any
    key: int
    n_buckets: int
    in_flight: int


@dataclass(frozen=True, kw_only=True)
class CollectiveStream:
    """Where a `collective` publish is read from: learner rank 0's store, and the layout of its buckets.

    Attributes:
        host (str): the node address of learner rank 0, whose `TCPStore` hands out tickets and groups.
        port (int): that store's port.
        key (int): the publish's number at rank 0's sender (one per publish, live or eval-only).
        backend (str): the process groups' backend, gloo (CPU tensors) or nccl (GPU tensors).
        buckets (tuple): per bucket, the (name, dtype, shape) of each tensor in it, in order: a reader
            allocates each bucket's bytes and cuts them into tensors with it.
        timeout_s (float): how long a group's rendezvous and each broadcast may take.
        shared (tuple[bytes, ...] | None): per bucket, a pickled handle to its buffer (`buckets.share`: a CUDA
            IPC handle on a GPU, a memfd opened through /proc on the CPU) that `pickle.loads` maps: a reader on the same
            device maps it instead of joining a broadcast; None: `runtime.weight_sync_same_device` is off or the
            buffers could not be shared.
        shared_on (str): the device those handles live on, "<host>:<boot id>/<GPU uuid or cpu>" ("" without
            them).
    """

    host: str
    port: int
    key: int
    backend: str
    buckets: tuple[tuple[tuple[str, str, tuple[int, ...]], ...], ...]
    timeout_s: float
    shared: tuple[bytes, ...] | None = None
    shared_on: str = ""


@dataclass(frozen=True, kw_only=True)
class WeightsHandle:
    """Where a published set of trainable weights lives.

    Attributes:
        backend (str): the weight-sync backend that wrote it (weight_sync.build names).
        policy_version (int): the learner step count the weights belong to (0 = the initial weights).
        generation (int): the learner (re)start count: a resumed learner may publish an older version than a
            worker holds, and the generation tells the worker to take it anyway.
        refs (tuple[ObjectRef, ...]): one ObjectRef per safetensors byte bucket (`lora_delta`); () when
            `stream` holds them.
        nbytes (int): the buckets' total size in bytes.
        n_tensors (int): the tensors in the buckets.
        publish_seconds (float): the time the learner spent publishing them.
        eval_only (bool): the EMA shadow at that version, published for an in-run eval; a rollout never samples
            with it.
        stream (BucketStream | CollectiveStream | None): where a `full_state` publish's buckets are read from,
            or where a `collective` publish is broadcast from (None: `refs`).
    """

    backend: str
    policy_version: int
    generation: int
    refs: tuple[Any, ...]
    nbytes: int
    n_tensors: int
    publish_seconds: float
    eval_only: bool = False
    stream: BucketStream | CollectiveStream | None = None


@dataclass(frozen=True, kw_only=True)
class RolloutRequest:
    """One batch of prompts to sample at `step`, with the weights and the plan it must be sampled with.

    Attributes:
        step (int): the training step (or, for an eval, the step done).
        seed (int): the run's seed; noise derives from (seed, step).
        prompts (tuple[str, ...]): this request's rows of the step's batch.
        weights (WeightsHandle | None): the weights to sample with (None: the worker's current ones).
        total_batch (int): the step's whole batch (this request may be one shard of it).
        plan (Plan | None): the step's plan, drawn once by the driver; the cache is kept for it and carries it.
            None for an eval, which keeps no trajectory.
        version (int): PAYLOAD_VERSION of the sender.
    """

    step: int
    seed: int
    prompts: tuple[str, ...]
    weights: WeightsHandle | None
    total_batch: int
    plan: Plan | None = None
    version: int = PAYLOAD_VERSION


@dataclass(frozen=True, kw_only=True)
class RolloutStats:
    """What a rollout worker says about a cache it produced (the cache itself is a separate ObjectRef).

    Attributes:
        step (int), worker (int), pid (int): which step, which worker, which process.
        policy_version (int): the version of the weights it sampled with.
        samples (int): its rows of the step's batch.
        piece_nbytes (tuple[int, ...]): the size of each serialized piece of the cache (one per learner rank the
            shard covers, in batch order).
        rollout_seconds (float): the `rollout` stage: encode, sample and serialise.
        sync_seconds (float): applying new weights before this rollout (0 when already current).
    """

    step: int
    worker: int
    pid: int
    policy_version: int
    samples: int
    piece_nbytes: tuple[int, ...]
    rollout_seconds: float
    sync_seconds: float


@dataclass(frozen=True, kw_only=True)
class LearnerWork:
    """The driver's offer to the learner group: the cache(s) for `step`.

    Attributes:
        step (int): the training step.
        rank_refs (tuple[tuple[ObjectRef, ...], ...]): per learner rank, the cache pieces holding exactly its
            rows of the batch, in batch order (pieces of one or more rollout shards); rank r fetches
            `rank_refs[r]` alone.
        rollout_policy_version (int): the version the shards were sampled with.
        generation (int): the learner generation whose weights sampled it; the board drops other generations'.
    """

    step: int
    rank_refs: tuple[tuple[Any, ...], ...]
    rollout_policy_version: int
    generation: int = 0


@dataclass(frozen=True, kw_only=True)
class StepOutcome:
    """One learner step as rank 0 saw it.

    Attributes:
        step (int): the step index; generation (int): the learner generation that ran it.
        loss (float), reward_mean (float), grad_norm (float): the group's (nan when the run failed at it).
        residual (float): the straight-through residual at the end, mean over the batch.
        skipped (bool), skip_reason (str): not applied, and why ("" when applied).
        policy_version (int): the learner version after the step.
        staleness (int): the learner version before the step minus the version the cache was sampled with.
        samples (int): the step's whole batch.
        phase_seconds (dict[str, float]): rank 0's seconds per stage (flowbp_core.stages).
        weights (WeightsHandle | None): the weights published after the step (None when skipped).
        checkpoint (str | None): the checkpoint written after the step.
        failed (str | None): set when the learner gives up (too many non-finite steps in a row).
        eval_weights (WeightsHandle | None): the EMA shadow (eval_only) when an eval is due and EMA is on.
        fetched_bytes (tuple[int, ...]): per learner rank, the cache bytes it read from the object store for the
            step (its pieces; () when not measured).
    """

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
    failed: str | None = None
    eval_weights: WeightsHandle | None = None
    fetched_bytes: tuple[int, ...] = ()


@dataclass(frozen=True, kw_only=True)
class LearnerHello:
    """Sent by rank 0 each time the learner group (re)starts.

    Attributes:
        generation (int): the new learner generation.
        start_step (int): the step it resumes at (0 on a fresh run).
        policy_version (int): the version of the weights it resumed with.
        weights (WeightsHandle): those weights, published.
        pids (tuple[int, ...]): the learner processes (rank 0's).
        resumed_from (str | None): the checkpoint it loaded.
    """

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
