"""Chained references: backpropagation through the true Euler chain (DRaFT-K, AlignProp, full BPTT).

Not expressible with detached inputs, so they bypass the surrogate segments: the cached z_a is re-integrated
with every model input carrying gradient, one checkpoint per grad-carrying step. The result is pinned to the
cached final latent (the value is the sample; the gradient is the chain's), and the pin residual d_0 shows the
recompute drift. The chain rule needs I + h J_guided per step, so the negative CFG branch runs with gradient
(input and weights): a detached one would make each factor I + h g J_cond, g times too large, compounding.

Truncation: "tail" backpropagates the last K steps (DRaFT-K; K random once per step with `random_k`); "per_step"
is AlignProp's public code: at every step i a threshold t_i ~ U{a..b} is drawn and the model output of step i
carries gradient iff i >= t_i, while the latent is never detached, so gradient from every grad-carrying step
flows through the Jacobians of the grad-carrying steps after it. a, b = round(lo N), round(hi N) with
`trunc_range` = (lo, hi) = (0.7, 0.9), AlignProp's (35, 45) of its 50 steps; b is capped at N-1 so the last step
always carries gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flowbp_core.cache import TrajectoryCache
from flowbp_core.errors import ConfigError
from flowbp_core.guidance import GuidanceConfig
from flowbp_core.methods import checks
from flowbp_core.methods.base import Diagnostics, Endpoint, Plan, VelocityFn
from flowbp_core.methods.common import EngineMethod, GuidanceParams, cache_plan
from flowbp_core.methods.engine import per_sample_mean_abs, run_chain
from flowbp_core.methods.registry import make_params, register

TRUNCATIONS = ("tail", "per_step")


@dataclass(frozen=True)
class ChainParams(GuidanceParams):
    k: int | None = 1  # tail: steps backpropagated (None = all: full BPTT)
    k_min: int = 1  # tail with random_k: K ~ U{k_min..k_max}
    k_max: int | None = None  # None = N
    random_k: bool = False
    truncation: str = "tail"
    trunc_range: tuple[float, float] = (0.7, 0.9)  # per_step: thresholds U{round(lo N)..round(hi N)}
    checkpoint: bool = True
    n_steps: int | None = None

    def validate(self) -> None:
        self.validate_guidance()
        if self.detach_negative:
            raise ConfigError("method.detach_negative", True, "false or unset: a chained method differentiates "
                              "the guided velocity through both CFG branches")
        checks.one_of("truncation", self.truncation, TRUNCATIONS)
        if len(self.trunc_range) != 2:
            raise ConfigError("method.trunc_range", list(self.trunc_range), "two fractions [lo, hi] of N")
        lo, hi = (float(x) for x in self.trunc_range)
        checks.in_range("trunc_range", lo, 0.0, 1.0)
        checks.in_range("trunc_range", hi, lo, 1.0)
        if self.k is not None:
            checks.integer("k", self.k, 1)
        checks.integer("k_min", self.k_min, 1)
        if self.k_max is not None:
            checks.integer("k_max", self.k_max, self.k_min)
        if self.n_steps is not None:
            checks.integer("n_steps", self.n_steps, 1)
            self.check_n(self.n_steps)

    def check_n(self, n: int) -> None:
        if self.truncation == "per_step":
            return
        if self.k is not None:
            checks.k_within(self.k, n)
        checks.k_within(self.k_min, n, "k_min")

    def thresholds(self, n: int) -> tuple[int, int]:
        """AlignProp's threshold range [a, b] for N steps (b <= N-1: the last step always carries gradient)."""
        lo, hi = self.trunc_range
        b = min(round(hi * n), n - 1)
        return min(round(lo * n), b), b


def per_step_active(n: int, a: int, b: int, generator: torch.Generator) -> tuple[int, ...]:
    """Steps i with i >= t_i, one threshold t_i ~ U{a..b} drawn per step in step order (AlignProp)."""
    t = torch.randint(a, b + 1, (n,), generator=generator).tolist()
    return tuple(i for i in range(n) if i >= t[i])


class ChainMethod(EngineMethod):
    def __init__(self, name: str, params: ChainParams):
        self.name, self.params = name, params

    def guidance(self, base: GuidanceConfig) -> GuidanceConfig:
        """Both CFG branches carry gradient: the chain differentiates the guided velocity itself."""
        return GuidanceConfig(base.mode, base.scale, detach_negative=False)

    def plan(self, n_steps: int, generator: torch.Generator) -> Plan:
        p = self.params
        p.check_n(n_steps)
        if p.truncation == "per_step":
            active = per_step_active(n_steps, *p.thresholds(n_steps), generator)
            return Plan(method=self.name, n_steps=n_steps, chain_start=active[0], chain_active=active)
        if p.random_k:
            hi = n_steps if p.k_max is None else min(p.k_max, n_steps)
            k = int(torch.randint(p.k_min, hi + 1, (1,), generator=generator))
        else:
            k = n_steps if p.k is None else p.k
        return Plan(method=self.name, n_steps=n_steps, chain_start=n_steps - k)

    def endpoint(self, cache: TrajectoryCache, velocity: VelocityFn) -> Endpoint:
        plan = cache_plan(cache, self.name)
        if plan.chain_start is None:
            raise ValueError(f"{self.name} needs a chain plan, got segments")
        value, raw = run_chain(cache, velocity, plan.chain_start, checkpoint=self.params.checkpoint,
                               active=plan.chain_active)
        b = cache.batch_size
        diag = Diagnostics(
            active=plan.active,
            anchors=None,
            residual_j=None,
            residual_0=per_sample_mean_abs(cache.final, raw),
            jacobian_factors=plan.jacobian_factors,
            extra={"forwards_with_grad": float(len(plan.chain_steps))},
        )
        return Endpoint(value, torch.ones(b, device=value.device), torch.arange(b, device=value.device), diag)


@register("draft_k")
def build_draft_k(backbone: str | None, **overrides) -> ChainMethod:
    return ChainMethod("draft_k", make_params(ChainParams, {"k": 1}, overrides))


@register("alignprop")
def build_alignprop(backbone: str | None, **overrides) -> ChainMethod:
    # AlignProp's public code by default; truncation="tail", k=None, random_k=True is the contiguous-tail form
    return ChainMethod("alignprop", make_params(ChainParams, {"k": None, "truncation": "per_step"}, overrides))


@register("full_bptt")
def build_full_bptt(backbone: str | None, **overrides) -> ChainMethod:
    return ChainMethod("full_bptt", make_params(ChainParams, {"k": None}, overrides))
