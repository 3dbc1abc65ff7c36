"""The one surrogate engine: evaluates any Plan against a cache with gradients exactly as the plan prescribes.

For each segment the VALUE and the GRADIENT are built separately, then joined so the value is exact:

    value  z_val = z_start + sum_m w_m V_m             (no grad, node order, float32; bitwise the rollout's sum
                                                         when every V_m is the cached / re-forwarded velocity)
    grad   delta = (z_in - sg(z_in)) + sum_{m active} w_m beta_m g (u_m - sg(u_m))      (value exactly 0)
    est    = z_val + delta
    pinned = sg(true) + (est - sg(est))                  (value = the cached true state, bitwise)

Why split: the graph holds only the active forwards (memory flat in N), and the value does not depend on how
many cached velocities were summed with grad-carrying tensors. Model inputs are always detached cached states,
except the start node of a bridged segment, which sees sg(z) + alpha (z - sg(z)) of the pinned incoming state:
that is the single nested path through a state Jacobian, scaled by alpha.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flowbp_core.cache import TrajectoryCache
from flowbp_core.methods.base import Plan, SegmentPlan, VelocityFn
from flowbp_core.quadrature import leap_weights
from flowbp_core.sampling import euler_add


def compute_dtype(cache: TrajectoryCache) -> torch.dtype:
    """Connector arithmetic runs in float32 (float64 if the cache itself is float64, as in exact tests)."""
    return torch.promote_types(cache.noise.dtype, torch.float32)


def per_sample_mean_abs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return (a.detach().to(torch.float32) - b.detach().to(torch.float32)).abs().flatten(1).mean(1)


def pin(true: torch.Tensor, est: torch.Tensor) -> torch.Tensor:
    """Straight-through: the value of `true` (bitwise), the gradient of `est`.

    Written sg(true) + (est - sg(est)) rather than est + sg(true - est): the latter rounds twice and is not
    bitwise the true state in float32.
    """
    return true.detach() + (est - est.detach())


@dataclass
class SegmentResult:
    est_value: torch.Tensor  # z_hat_end (no grad)
    out: torch.Tensor  # pinned (or raw) end state carrying the gradient
    residual: torch.Tensor  # per-sample mean |true_end - z_hat_end|
    g: float
    forwards: int
    weights: list[float]


@dataclass
class SurrogateResult:
    value: torch.Tensor
    segments: list[SegmentResult]


def segment_weights(seg: SegmentPlan, sigmas: list[float]) -> list[float]:
    return [float(w) for w in leap_weights(seg.quadrature, seg.nodes, sigmas, seg.start, seg.end)]


def rescale_factor(plan: Plan, weights: list[list[float]]) -> list[float]:
    """g = 1 + gamma (trainable mass / active mass - 1), globally or per segment (algorithms.md 2.4)."""
    if plan.gamma == 0.0:
        return [1.0] * len(plan.segments)

    def masses(seg: SegmentPlan, w: list[float]) -> tuple[float, float]:
        by_node = dict(zip(seg.nodes, w))
        window = seg.nodes if seg.window is None else seg.window
        total = sum(abs(by_node[m]) for m in window if m in by_node)
        act = sum(abs(by_node[m]) for m in seg.active_nodes)
        return total, act

    ms = [masses(s, w) for s, w in zip(plan.segments, weights)]
    if plan.rescale == "global":
        total, act = sum(m[0] for m in ms), sum(m[1] for m in ms)
        g = 1.0 + plan.gamma * (total / act - 1.0) if act > 0 else 1.0
        return [g] * len(plan.segments)
    return [1.0 + plan.gamma * (t / a - 1.0) if a > 0 else 1.0 for t, a in ms]


def run_surrogate(plan: Plan, cache: TrajectoryCache, velocity: VelocityFn) -> SurrogateResult:
    if plan.n_steps != cache.n_steps:
        raise ValueError(f"plan is for N={plan.n_steps} steps, cache has N={cache.n_steps}")
    dtype = cache.noise.dtype
    cdt = compute_dtype(cache)
    sig = [float(s) for s in cache.sigmas.cpu()]
    all_w = [segment_weights(s, sig) for s in plan.segments]
    gs = rescale_factor(plan, all_w)
    z: torch.Tensor | None = None  # incoming pinned state (carries gradient), None before the first segment
    results: list[SegmentResult] = []
    for seg, w, g in zip(plan.segments, all_w, gs):
        start_true = cache.state(seg.start).detach().to(cdt)
        z_start = start_true if z is None else z
        beta = dict(seg.active)
        u: dict[int, torch.Tensor] = {}
        for m in seg.active_nodes:
            if m == seg.start and seg.bridge_alpha > 0 and z is not None and z.requires_grad:
                zd = z.detach()
                x = (zd + seg.bridge_alpha * (z - zd)).to(dtype)
            else:
                x = cache.state(m).detach()
            u[m] = velocity(x, sig[m]).to(cdt)
        with torch.no_grad():
            zv = z_start.detach()
            for m, wm in zip(seg.nodes, w):
                vm = u[m].detach() if m in u else cache.velocity(m).to(cdt)
                zv = euler_add(zv, wm, vm)
            if seg.lam != 1.0:
                v_s = u[seg.start].detach() if seg.start in u else cache.velocity(seg.start).to(cdt)
                z_eul = euler_add(z_start.detach(), sig[seg.end] - sig[seg.start], v_s)
                zv = z_eul + seg.lam * (zv - z_eul)
        est = zv
        if z_start.requires_grad:
            est = est + (z_start - z_start.detach())
        by_w = dict(zip(seg.nodes, w))
        for m, um in u.items():
            coef = by_w[m] * beta[m] * g * seg.lam
            if m == seg.start and seg.lam != 1.0:
                coef += (1.0 - seg.lam) * (sig[seg.end] - sig[seg.start])
            est = est + coef * (um - um.detach())
        true_end = cache.state(seg.end).detach().to(cdt)
        residual = per_sample_mean_abs(true_end, zv)
        z = pin(true_end, est) if seg.pin else est
        results.append(SegmentResult(zv, z, residual, g, len(u), w))
    assert z is not None
    return SurrogateResult(z, results)


def run_chain(
    cache: TrajectoryCache, velocity: VelocityFn, start: int, *, checkpoint: bool = True,
    active: tuple[int, ...] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backprop through the true Euler chain z_{i+1} = z_i + h_i v(z_i) for i >= start, inputs carrying grad.

    `active` (None = every step) names the steps whose velocity carries gradient; any other step adds its cached
    velocity, the value the rollout computed there, so its factor in the chain rule is the identity. With
    checkpoint=True each active step saves only its input and is recomputed in backward (per-step
    checkpointing, O(K) boundary latents). Returns (pinned endpoint, raw chain end).
    """
    dtype = cache.noise.dtype
    cdt = compute_dtype(cache)
    sig = [float(s) for s in cache.sigmas.cpu()]
    grad_steps = set(range(start, cache.n_steps)) if active is None else set(active)
    z = cache.state(start).detach().to(cdt)
    for i in range(start, cache.n_steps):
        h, s = sig[i + 1] - sig[i], sig[i]
        if i not in grad_steps:
            z = euler_add(z, h, cache.velocity(i).to(cdt))
            continue

        def step(zz: torch.Tensor, h: float = h, s: float = s) -> torch.Tensor:
            return euler_add(zz, h, velocity(zz.to(dtype), s).to(cdt))

        if checkpoint:
            z = torch.utils.checkpoint.checkpoint(step, z, use_reentrant=False)
        else:
            z = step(z)
    return pin(cache.final.to(cdt), z), z
