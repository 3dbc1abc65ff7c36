"""Job records and the job state machine (what the store keeps and the API returns).

    pending --> submitted --> running --> succeeded
       |            |  ^         |  \\-> failed | cancelled
       |            |  +---------+  (running -> submitted: the Ray job died and was resubmitted to resume)
       +--> failed | cancelled      (submitted -> succeeded/failed/cancelled too: a short job can finish between
                                     two polls, so `running` may never be seen)

Every transition is recorded with its time and a human-readable reason; terminal states never change again.
"""

from __future__ import annotations

import time
from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from flowbp_core.config import FINITE_NUMBERS


class JobState(str, Enum):
    pending = "pending"
    submitted = "submitted"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobState.succeeded, JobState.failed, JobState.cancelled})
ACTIVE = (JobState.pending, JobState.submitted, JobState.running)

TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.pending: frozenset({JobState.submitted, JobState.failed, JobState.cancelled}),
    JobState.submitted: frozenset({JobState.running, JobState.submitted, JobState.succeeded, JobState.failed,
                                   JobState.cancelled}),
    JobState.running: frozenset({JobState.submitted, JobState.succeeded, JobState.failed, JobState.cancelled}),
    JobState.succeeded: frozenset(),
    JobState.failed: frozenset(),
    JobState.cancelled: frozenset(),
}


class InvalidTransition(RuntimeError):
    def __init__(self, job_id: str, frm: JobState, to: JobState):
        self.job_id, self.frm, self.to = job_id, frm, to
        allowed = ", ".join(sorted(s.value for s in TRANSITIONS[frm])) or "none (terminal)"
        super().__init__(f"job {job_id}: {frm.value} -> {to.value} is not allowed (from {frm.value}: {allowed})")


class Transition(BaseModel):
    model_config = ConfigDict(extra="forbid", **FINITE_NUMBERS)

    state: JobState
    at: float = Field(description="unix time, seconds")
    reason: str


class CheckpointRef(BaseModel):
    """The newest complete checkpoint of a run: runs/<run_id>/step_<n>/ holding a COMPLETE marker."""

    model_config = ConfigDict(extra="forbid", **FINITE_NUMBERS)

    step: int
    path: str
    completed_at: float


class JobRecord(BaseModel):
    """One job as stored in Redis (JSON). `version` increases with every write (optimistic concurrency)."""

    model_config = ConfigDict(extra="forbid", **FINITE_NUMBERS)

    id: str
    name: str
    labels: dict[str, str] = Field(default_factory=dict)
    run_id: str
    state: JobState = JobState.pending
    reason: str = "accepted"
    created_at: float
    updated_at: float
    history: list[Transition] = Field(default_factory=list)
    # The validated RunConfig as plain JSON: a stored record must stay readable after the schema gains or
    # renames a field, so it is re-validated only when it is submitted, never when it is read.
    config: dict[str, Any]
    max_resubmits: int
    attempts: int = Field(0, description="Ray submissions made so far (1 + resubmissions)")
    ray_submission_id: str | None = None
    ray_status: str | None = None
    ray_message: str | None = None
    cancel_requested: bool = False
    stop_pending: bool = Field(False, description="Ray could not be told to stop yet; the reconciler retries")
    next_dispatch_at: float = Field(0.0, description="back-off: do not try to submit before this time")
    first_dispatch_error_at: float | None = None
    latest_checkpoint: CheckpointRef | None = None
    version: int = 0

    def transition(self, to: JobState, reason: str, now: float | None = None) -> None:
        if to not in TRANSITIONS[self.state]:
            raise InvalidTransition(self.id, self.state, to)
        now = time.time() if now is None else now
        self.state = to
        self.reason = reason
        self.updated_at = now
        self.history.append(Transition(state=to, at=now, reason=reason))


# ---- API payloads ----------------------------------------------------------------------------------------------

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
LABEL_KEY_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}$"


class JobSummary(BaseModel):
    id: str
    name: str
    labels: dict[str, str]
    run_id: str
    state: JobState
    reason: str
    created_at: float
    updated_at: float
    attempts: int
    latest_checkpoint: CheckpointRef | None

    @classmethod
    def of(cls, r: JobRecord) -> "JobSummary":
        return cls(**{k: getattr(r, k) for k in cls.model_fields})


class JobDetail(JobSummary):
    history: list[Transition]
    config: dict[str, Any]
    max_resubmits: int
    ray_submission_id: str | None
    ray_status: str | None
    ray_message: str | None
    cancel_requested: bool


class JobPage(BaseModel):
    jobs: list[JobSummary]
    next_cursor: int | None = Field(description="pass as `cursor` for the next page; null at the end")


class LogChunk(BaseModel):
    job_id: str
    ray_submission_id: str | None
    text: str
    offset: int = Field(description="character offset of the end of `text`: pass as `offset` to follow")


class MetricPoint(BaseModel):
    model_config = ConfigDict(extra="allow")

    step: int


class JobMetrics(BaseModel):
    job_id: str
    run_id: str
    latest: MetricPoint | None
    history: list[MetricPoint]


class CheckpointInfo(BaseModel):
    step: int
    path: str
    complete: bool


class JobCheckpoints(BaseModel):
    job_id: str
    run_id: str
    checkpoints: list[CheckpointInfo]
    latest_complete: CheckpointRef | None


class LoraLink(BaseModel):
    job_id: str
    step: int
    file: str
    bytes: int
    format: str = Field(description="`diffusers` (load_lora_weights) or `trainable_state_dict` (the adapter's "
                                    "weights as the checkpoint holds them)")
    url: str = Field(description="GET it (with the bearer token) to download the safetensors file")
