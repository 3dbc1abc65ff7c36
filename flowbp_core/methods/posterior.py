"""Posterior-mean baselines on the same engine: ReFL, DRTune (emulation), DRaFT-LV.

Their reward input is the one-step estimate x0_hat = z_s - sigma_s v(sg(z_s)), an unpinned leap segment
[s, N) with the single node s; the value is NOT the sample (except at s = N-1, where it is the last Euler step).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flowbp_core.cache import TrajectoryCache
from flowbp_core.methods import checks
from flowbp_core.methods.base import Endpoint, Plan, SegmentPlan, VelocityFn
from flowbp_core.methods.common import EngineMethod, GuidanceParams, cache_plan
from flowbp_core.methods.engine import compute_dtype, per_sample_mean_abs, run_surrogate
from flowbp_core.methods.registry import make_params, register
from flowbp_core.methods.indices import evenly_spaced


def _leap(s: int, n: int, active: bool) -> SegmentPlan:
    return SegmentPlan(start=s, end=n, nodes=(s,), quadrature="lagrange", active=((s, 1.0),) if active else (),
                       pin=False)


# ---- ReFL ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReFLParams(GuidanceParams):
    last_n: int = 11  # rev ~ U{1..last_n}, g = N - rev (refl_last_n_steps)
    n_steps: int | None = None

    def validate(self) -> None:
        self.validate_guidance()
        checks.integer("last_n", self.last_n, 1)
        if self.n_steps is not None:
            checks.k_within(self.last_n, self.n_steps, "last_n")


class ReFL(EngineMethod):
    def __init__(self, params: ReFLParams):
        self.name, self.params = "refl", params

    def plan(self, n_steps: int, generator: torch.Generator) -> Plan:
        hi = min(self.params.last_n, n_steps)
        rev = int(torch.randint(1, hi + 1, (1,), generator=generator))
        g = n_steps - rev
        return Plan(method=self.name, n_steps=n_steps, segments=(_leap(g, n_steps, True),))


@register("refl")
def build_refl(backbone: str | None, **overrides) -> ReFL:
    return ReFL(make_params(ReFLParams, {}, overrides))


# ---- DRTune ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DRTuneParams(GuidanceParams):
    k: int = 3  # training steps, evenly spaced in [0, s]
    stop_frac: float = 0.4  # early stop s = N - r, r ~ U{1..round(stop_frac N)}
    gamma: float = 0.0
    n_steps: int | None = None

    def validate(self) -> None:
        self.validate_guidance()
        checks.integer("k", self.k, 1)
        checks.in_range("stop_frac", self.stop_frac, 0.0, 1.0, low_open=True)
        checks.in_range("gamma", self.gamma, 0.0, 1.0)
        if self.n_steps is not None:
            checks.k_within(self.k, self.n_steps)


class DRTune(EngineMethod):
    """Inputs all detached (no J); the latent accumulates the train steps' grads up to the early stop s, then
    the reward sees the posterior mean from s. Our Euler piece [0, s) is pinned to the cached z_s, so the leap
    starts from the true state (the reference recomputes the same value inline)."""

    def __init__(self, params: DRTuneParams):
        self.name, self.params = "drtune", params

    def plan(self, n_steps: int, generator: torch.Generator) -> Plan:
        p = self.params
        checks.k_within(p.k, n_steps)
        r_max = max(1, round(p.stop_frac * n_steps))
        r = int(torch.randint(1, r_max + 1, (1,), generator=generator))
        s = n_steps - r
        k = min(p.k, s + 1)
        train = evenly_spaced(s, k, generator)
        segs = []
        if s > 0:
            segs.append(SegmentPlan(start=0, end=s, nodes=tuple(range(s)), quadrature="euler",
                                    active=tuple((i, 1.0) for i in train if i < s)))
        segs.append(_leap(s, n_steps, s in train))
        return Plan(method=self.name, n_steps=n_steps, segments=tuple(segs), gamma=p.gamma, anchors=None)


@register("drtune")
def build_drtune(backbone: str | None, **overrides) -> DRTune:
    return DRTune(make_params(DRTuneParams, {}, overrides))


# ---- DRaFT-LV ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DraftLVParams(GuidanceParams):
    n: int = 2  # re-noised copies of the last step

    def validate(self) -> None:
        self.validate_guidance()
        checks.integer("n", self.n, 0)


def renoise_noise(plan: Plan, cache: TrajectoryCache, shape: torch.Size, dtype: torch.dtype) -> list[torch.Tensor]:
    """DRaFT-LV's re-noising draws, one tensor of `shape` per copy. Each sample's draws come from its own
    generator, keyed by the cache's seed and the sample's index in the whole batch (`meta["batch_offset"]` plus
    its row), so a batch split over learner ranks draws exactly what one rank draws for the whole batch."""
    offset = int(cache.meta.get("batch_offset", "0"))
    per_sample = []
    for row in range(shape[0]):
        seed = (plan.noise_seed ^ (int(cache.seed) * 0x9E3779B1) ^ ((offset + row) * 0x85EBCA77)) % 2**63
        g = torch.Generator(device="cpu").manual_seed(seed)
        per_sample.append(torch.randn((plan.renoise, *shape[1:]), generator=g, dtype=dtype))
    if not per_sample:
        return [torch.empty(shape, dtype=dtype) for _ in range(plan.renoise)]
    return list(torch.stack(per_sample, 1).unbind(0))


class DraftLV(EngineMethod):
    """Last step with grad, plus n copies re-noised to sigma_{N-1} and denoised again (each with grad, detached
    input). Returns B*(1+n) rows: [base rows, copy 1 rows, ...]; sample_index maps each row to its prompt."""

    def __init__(self, params: DraftLVParams):
        self.name, self.params = "draft_lv", params

    def plan(self, n_steps: int, generator: torch.Generator) -> Plan:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        return Plan(method=self.name, n_steps=n_steps, segments=(_leap(n_steps - 1, n_steps, True),),
                    renoise=self.params.n, noise_seed=seed)

    def endpoint(self, cache: TrajectoryCache, velocity: VelocityFn) -> Endpoint:
        plan = cache_plan(cache, self.name)
        res = run_surrogate(plan, cache, velocity)
        base = self._endpoint_from(plan, cache, res)
        s = plan.n_steps - 1
        sigma = float(cache.sigmas[s])
        cdt = compute_dtype(cache)
        x0 = base.value.detach()
        noise = renoise_noise(plan, cache, x0.shape, cdt)
        rows = [base.value]
        for eps in noise:
            eps = eps.to(x0.device)
            z = (1.0 - sigma) * x0 + sigma * eps
            u = velocity(z.to(cache.noise.dtype), sigma).to(cdt)
            rows.append(z - sigma * u)
        b = cache.batch_size
        value = torch.cat(rows, 0)
        d = base.diagnostics
        d.residual_0 = per_sample_mean_abs(cache.final.repeat(1 + plan.renoise, *[1] * (x0.dim() - 1)), value)
        d.extra["forwards_with_grad"] = float(1 + plan.renoise)
        return Endpoint(
            value=value,
            weights=torch.ones(b * (1 + plan.renoise), device=value.device),
            sample_index=torch.arange(b, device=value.device).repeat(1 + plan.renoise),
            diagnostics=d,
        )


@register("draft_lv")
def build_draft_lv(backbone: str | None, **overrides) -> DraftLV:
    return DraftLV(make_params(DraftLVParams, {}, overrides))
