"""Shared endpoint logic for every method that runs the surrogate engine on a Plan."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from flowbp_core.cache import CacheNeeds, TrajectoryCache
from flowbp_core.guidance import GuidanceConfig
from flowbp_core.methods import checks
from flowbp_core.methods.base import Diagnostics, Endpoint, Plan, VelocityFn
from flowbp_core.methods.engine import SurrogateResult, per_sample_mean_abs, run_surrogate


@dataclass(frozen=True)
class GuidanceParams:
    """What a method changes in the guidance its re-forwards use and in its loss (algorithms.md 2.5).

    Attributes:
        detach_negative (bool | None): None keeps the backbone's setting; False runs the negative CFG branch with
            gradient (its input and its weights); True runs it under no_grad on a detached input.
        cfg_grad_norm_compensate (bool): divide the loss by the true-CFG scale g when g > 1 (the reference's
            `cfg_grad_norm_compensate`); it changes the step only where the gradient-norm clip engages.
    """

    detach_negative: bool | None = None
    cfg_grad_norm_compensate: bool = False

    def validate_guidance(self) -> None:
        checks.boolean("detach_negative", self.detach_negative, allow_none=True)
        checks.boolean("cfg_grad_norm_compensate", self.cfg_grad_norm_compensate)


def cache_plan(cache: TrajectoryCache, method: str) -> Plan:
    """The plan `cache` was kept for, which must be `method`'s (a compacted cache serves only its own plan)."""
    plan = cache.plan
    if plan is None:
        raise ValueError("cache.plan is None: a learner step runs the plan its rollout was issued with; pass "
                         "rollout(..., plan=method.plan(n, generator)) or cache.with_plan(plan)")
    if plan.method != method:
        raise ValueError(f"cache.plan.method={plan.method!r}, but this endpoint is {method!r}'s: a method runs only "
                         "its own plans")
    return plan


class EngineMethod:
    """A method = a plan sampler; the endpoint is the engine's. Subclasses implement `plan`."""

    name: str = "engine"
    params: GuidanceParams

    def guidance(self, base: GuidanceConfig) -> GuidanceConfig:
        """The guidance the learner re-forwards with: the backbone's, with this method's detach_negative if set."""
        override = getattr(self.params, "detach_negative", None)
        return base if override is None else dataclasses.replace(base, detach_negative=override)

    def loss_scale(self, guidance: GuidanceConfig) -> float:
        """1/g under true CFG with g > 1 when the method compensates the CFG-amplified gradient, else 1."""
        on = getattr(self.params, "cfg_grad_norm_compensate", False)
        return 1.0 / guidance.scale if on and guidance.mode == "true" and guidance.scale > 1.0 else 1.0

    def plan(self, n_steps: int, generator: torch.Generator) -> Plan:  # pragma: no cover - abstract
        raise NotImplementedError

    def needs(self, plan: Plan, n_steps: int) -> CacheNeeds:
        if plan.n_steps != n_steps:
            raise ValueError(f"plan is for N={plan.n_steps} steps, asked for N={n_steps}")
        return plan.needs()

    def endpoint(self, cache: TrajectoryCache, velocity: VelocityFn) -> Endpoint:
        plan = cache_plan(cache, self.name)
        res = run_surrogate(plan, cache, velocity)
        return self._endpoint_from(plan, cache, res)

    def _endpoint_from(self, plan: Plan, cache: TrajectoryCache, res: SurrogateResult) -> Endpoint:
        segs = res.segments
        pinned = [s for s, r in zip(plan.segments, segs) if s.pin]
        residual_j = segs[0].residual if len(segs) > 1 else None
        last = plan.segments[-1]
        residual_0 = segs[-1].residual if last.pin else per_sample_mean_abs(cache.final, res.value)
        b = cache.batch_size
        dev = res.value.device
        if plan.sample_weight == "traj_sim" and pinned:
            # w = 1 / sum_seg max(d_seg, tau) over the pinned connectors (LeapAlign / Lagrange)
            acc = torch.zeros(b, device=dev)
            for s, r in zip(plan.segments, segs):
                if s.pin:
                    acc = acc + r.residual.to(dev).clamp(min=plan.tau)
            weights = 1.0 / acc
        else:
            weights = torch.ones(b, device=dev)
        extra = {
            "forwards_with_grad": float(sum(r.forwards for r in segs)),
            "rescale_g": float(segs[0].g),
        }
        if len(segs) > 1:
            extra["rescale_g_last"] = float(segs[-1].g)
        diag = Diagnostics(
            active=plan.active,
            anchors=plan.anchors,
            residual_j=residual_j,
            residual_0=residual_0,
            jacobian_factors=plan.jacobian_factors,
            extra=extra,
        )
        return Endpoint(
            value=res.value,
            weights=weights.to(res.value.device),
            sample_index=torch.arange(b, device=res.value.device),
            diagnostics=diag,
        )
