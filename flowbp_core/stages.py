"""The named stages of a training step, and the one timer that records them.

The single-process loop, the Ray rollout worker and the Ray learner all time their work with `timed`, so the
same names reach `metrics.jsonl`, the `flowbp_step_phase_seconds` histogram (tag `phase`) and the dashboards.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

ROLLOUT = "rollout"  # prompts -> no-grad trajectory (rollout worker)
TRANSFER = "transfer"  # the cache from the object store to the learner
SURROGATE = "surrogate"  # the method's differentiable endpoint
REWARD = "reward"  # decode + reward (in the graph or served)
BACKWARD = "backward"  # loss.backward() and combining gradients over ranks
UPDATE = "update"  # clip -> optimizer step -> EMA
SYNC = "sync"  # publishing (learner) or applying (rollout worker) new weights

STAGES = (ROLLOUT, TRANSFER, SURROGATE, REWARD, BACKWARD, UPDATE, SYNC)


@contextmanager
def timed(stage: str, timings: dict[str, float]) -> Iterator[None]:
    """Add the wall seconds of the block to `timings[stage]` (a stage timed twice in a step adds up)."""
    if stage not in STAGES:
        raise ValueError(f"stage={stage!r} is not a step stage; one of {STAGES}")
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - t0
