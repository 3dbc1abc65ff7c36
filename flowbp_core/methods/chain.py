"""Chained references: backpropagation through the true Euler chain (DRaFT-K, AlignProp, full BPTT).

Not expressible with detached inputs, so they bypass the surrogate segments: the cached z_{N-K} is re-integrated
with every model input carrying gradient, one checkpoint per step. The result is pinned to the cached final
latent (the value is the sample; the gradient is the chain's), and the pin residual d_0 shows the recompute drift.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flowbp_core.cache import TrajectoryCache
from flowbp_core.methods import checks
from flowbp_core.methods.base import Diagnostics, Endpoint, Plan, VelocityFn
from flowbp_core.methods.common import EngineMethod
from flowbp_core.methods.engine import per_sample_mean_abs, run_chain
from flowbp_core.methods.registry import make_params, register


@dataclass(frozen=True)
class ChainParams:
    k: int | None = 1  # steps backpropagated (None = all: full BPTT)
    k_min: int = 1  # AlignProp: K ~ U{k_min..k_max}
    k_max: int | None = None  # None = N
    random_k: bool = False
    checkpoint: bool = True
    n_steps: int | None = None

    def validate(self) -> None:
        if self.k is not None:
            checks.integer("k", self.k, 1)
        checks.integer("k_min", self.k_min, 1)
        if self.k_max is not None:
            checks.integer("k_max", self.k_max, self.k_min)
        if self.n_steps is not None:
            checks.integer("n_steps", self.n_steps, 1)
            self.check_n(self.n_steps)

    def check_n(self, n: int) -> None:
        if self.k is not None:
            checks.k_within(self.k, n)
        checks.k_within(self.k_min, n, "k_min")


class ChainMethod(EngineMethod):
    def __init__(self, name: str, params: ChainParams):
        self.name, self.params = name, params

    def plan(self, n_steps: int, generator: torch.Generator) -> Plan:
        p = self.params
        p.check_n(n_steps)
        if p.random_k:
            hi = n_steps if p.k_max is None else min(p.k_max, n_steps)
            k = int(torch.randint(p.k_min, hi + 1, (1,), generator=generator))
        else:
            k = n_steps if p.k is None else p.k
        return Plan(method=self.name, n_steps=n_steps, chain_start=n_steps - k)

    def endpoint(self, cache: TrajectoryCache, velocity: VelocityFn, generator: torch.Generator | None = None,
                 plan: Plan | None = None) -> Endpoint:
        plan = self._resolve_plan(cache, generator, plan)
        if plan.chain_start is None:
            raise ValueError(f"{self.name} needs a chain plan, got segments")
        value, raw = run_chain(cache, velocity, plan.chain_start, checkpoint=self.params.checkpoint)
        b = cache.batch_size
        diag = Diagnostics(
            active=plan.active,
            anchors=None,
            residual_j=None,
            residual_0=per_sample_mean_abs(cache.final, raw),
            jacobian_factors=plan.jacobian_factors,
            extra={"forwards_with_grad": float(plan.n_steps - plan.chain_start)},
        )
        return Endpoint(value, torch.ones(b, device=value.device), torch.arange(b, device=value.device), diag)


@register("draft_k")
def build_draft_k(backbone: str | None, **overrides) -> ChainMethod:
    return ChainMethod("draft_k", make_params(ChainParams, {"k": 1}, overrides))


@register("alignprop")
def build_alignprop(backbone: str | None, **overrides) -> ChainMethod:
    return ChainMethod("alignprop", make_params(ChainParams, {"k": None, "random_k": True}, overrides))


@register("full_bptt")
def build_full_bptt(backbone: str | None, **overrides) -> ChainMethod:
    return ChainMethod("full_bptt", make_params(ChainParams, {"k": None}, overrides))
