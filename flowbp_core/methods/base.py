"""Types every method shares: the Endpoint the reward is computed on, its Diagnostics, and the Method protocol.
The sampled `Plan` and `SegmentPlan` are plain data in `flowbp_core.plan` (re-exported here); a cache carries
the plan it was kept for (`TrajectoryCache.plan`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from flowbp_core.cache import CacheNeeds, TrajectoryCache
from flowbp_core.plan import Plan, SegmentPlan
from flowbp_core.sampling import VelocityFn

__all__ = ["Diagnostics", "Endpoint", "Method", "Plan", "SegmentPlan", "VelocityFn"]


@dataclass
class Diagnostics:
    """Per-step facts about the gradient path, logged every step.

    residual_j / residual_0: per-sample mean |true - surrogate| at the first intermediate pin and at the end
    (for an unpinned posterior-mean endpoint: distance of the scored value from the true sample).
    jacobian_factors: from the plan (tests verify it against the graph). grad_norm: filled by the trainer.
    """

    active: list[int]
    anchors: tuple[int, int] | None
    residual_j: torch.Tensor | None
    residual_0: torch.Tensor | None
    jacobian_factors: int
    grad_norm: float | None = None
    extra: dict[str, float] = field(default_factory=dict)


@dataclass
class Endpoint:
    """value[b] is scored for prompt cache.prompts[sample_index[b]] with per-row weight weights[b] (detached)."""

    value: torch.Tensor
    weights: torch.Tensor
    sample_index: torch.Tensor
    diagnostics: Diagnostics


@runtime_checkable
class Method(Protocol):
    name: str

    def plan(self, n_steps: int, generator: torch.Generator) -> Plan: ...

    def needs(self, plan: Plan, n_steps: int) -> CacheNeeds: ...

    def endpoint(self, cache: TrajectoryCache, velocity: VelocityFn) -> Endpoint:
        """The differentiable endpoint of `cache.plan` (the plan the cache was kept for) under `velocity`."""
        ...
