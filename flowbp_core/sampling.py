"""The cached no-grad rollout: N Euler steps, every state and velocity kept for the learner's surrogate.

Why the numerics are exactly this:
- The Euler sum is accumulated in float32 (z <- z + h_i * v_i), with the *stored* velocity (cast to the state
  dtype and back), so that a surrogate which re-adds the cached velocities in the same order reproduces `final`
  bitwise in float32. `euler_add` is the one place both the rollout and the methods do this addition.
- The model is fed exactly the state that is stored (cast to the state dtype), so a re-forward at a cached state
  sees the same input the rollout did.
"""

from __future__ import annotations

from typing import Callable

import torch

from flowbp_core.cache import CacheNeeds, TrajectoryCache, cond_rows
from flowbp_core.plan import Plan
from flowbp_core.schedules import validate_sigmas


# The one velocity type: v(x, sigma), what `Backbone.bind` returns and what rollouts and methods call.
VelocityFn = Callable[[torch.Tensor, float], torch.Tensor]


def euler_add(z: torch.Tensor, h: float, v: torch.Tensor) -> torch.Tensor:
    """z + h * v in z's dtype (float32 in the rollout); `h` is a Python float from the float64 sigmas, so the
    product rounds once in that dtype."""
    return z + float(h) * v.to(z.dtype)


def micro_batched(bind: Callable[[dict[str, torch.Tensor]], VelocityFn], cond: dict[str, torch.Tensor], batch: int,
                  size: int | None, *, static: bool = False) -> VelocityFn:
    """The velocity of a batch of `batch` evaluated `size` rows at a time, each chunk bound (`bind(cond)`) to its
    rows of `cond` (`cache.cond_rows`); None or `size >= batch`: one call. Rows are independent in the model, so
    the chunks join into the batch's velocity up to the dtype's rounding.

    `static` (a transformer compiled with static shapes, `compile_for_sampling`): every call has the same rows,
    min(size, batch) (a short last chunk is padded by repeating its last row, whose outputs are dropped), so one
    graph serves the whole batch; each call starts a new CUDA-graph step and its output is copied out, because
    a CUDA graph's next replay overwrites its output buffer."""
    if size is not None and size < 1:
        raise ValueError(f"micro-batch size {size}: expected an integer >= 1 (or None for the whole batch)")
    size = batch if size is None else min(size, batch)
    if size == batch and not static:
        return bind(cond)
    parts = [(a, min(a + size, batch)) for a in range(0, batch, size)]
    bound = [bind({k: _pad(t, b - a, size) for k, t in cond_rows(cond, a, b, batch).items()} if static
                  else cond_rows(cond, a, b, batch)) for a, b in parts]

    def chunk(v: VelocityFn, x: torch.Tensor, sigma: float) -> torch.Tensor:
        if not static:
            return v(x, sigma)
        torch.compiler.cudagraph_mark_step_begin()
        return v(_pad(x, x.shape[0], size), sigma)[: x.shape[0]].clone()

    def velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
        if x.shape[0] != batch:
            raise ValueError(f"micro-batched velocity bound to a batch of {batch} got a state batch of {x.shape[0]}")
        outs = [chunk(v, x[a:b], sigma) for (a, b), v in zip(parts, bound)]
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    return velocity


def _pad(t: torch.Tensor, rows: int, size: int) -> torch.Tensor:
    """`t` with `size` rows when it has `rows` (its last row repeated); any other tensor is shared, kept whole."""
    if rows == size or t.dim() == 0 or t.shape[0] != rows:
        return t
    return torch.cat([t, t[-1:].expand(size - rows, *t.shape[1:])])


def compile_for_sampling(module: torch.nn.Module, *, cuda_graphs: bool, backend: str = "inductor") -> None:
    """Compile `module` in place (its parameter names and objects unchanged, so weight syncs copy into the same
    tensors the graph reads) with static shapes; `cuda_graphs` on a CUDA module: replayed as CUDA graphs
    (inductor's reduce-overhead mode), which removes the per-kernel launch cost that dominates small batches.
    Call it through `micro_batched(..., static=True)`: fixed rows and outputs copied out of the graph's buffers."""
    on_cuda = next(module.parameters()).is_cuda
    mode = "reduce-overhead" if cuda_graphs and on_cuda and backend == "inductor" else None
    module.compile(backend=backend, dynamic=False, mode=mode)


@torch.no_grad()
def rollout(
    velocity: VelocityFn,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    seed: int = 0,
    policy_version: int = 0,
    cond: dict[str, torch.Tensor] | None = None,
    prompts: list[str] | None = None,
    state_dtype: torch.dtype | None = None,
    progress: Callable[[int, int], None] | None = None,
    needs: CacheNeeds | None = None,
    plan: Plan | None = None,
    meta: dict[str, str] | None = None,
) -> TrajectoryCache:
    """Integrate dz/dsigma = v from sigma_0 = 1 (z_0 = noise) to sigma_N = 0 and cache the trajectory.

    `velocity(x, sigma)` is any callable returning a tensor shaped like x. `plan` (the step's sampled plan)
    travels in the cache and, unless `needs` says otherwise, limits which states / velocities are kept to
    `plan.needs()`; with neither, every state and velocity is kept. `progress(i, n)` is called after step i.
    """
    if needs is None and plan is not None:
        needs = plan.needs()
    sig = torch.as_tensor(sigmas).to(torch.float64).cpu()
    validate_sigmas(sig)
    n = int(sig.numel()) - 1
    dtype = state_dtype or noise.dtype
    keep_s = None if needs is None else needs.states
    keep_v = None if needs is None else needs.velocities
    sig_list = [float(s) for s in sig]

    x = noise.to(dtype)
    z32 = x.to(torch.float32)
    states: dict[int, torch.Tensor] = {}
    velocities: dict[int, torch.Tensor] = {}
    for i in range(n):
        if i > 0:
            x = z32.to(dtype)
            if keep_s is None or i in keep_s:
                states[i] = x
        v = velocity(x, sig_list[i])
        if tuple(v.shape) != tuple(x.shape):
            raise ValueError(f"velocity returned shape {tuple(v.shape)} for input {tuple(x.shape)} at step {i}")
        v = v.detach().to(dtype)
        if keep_v is None or i in keep_v:
            velocities[i] = v
        z32 = euler_add(z32, sig_list[i + 1] - sig_list[i], v)
        if progress is not None:
            progress(i, n)
    return TrajectoryCache(
        noise=noise.to(dtype),
        states=states,
        velocities=velocities,
        sigmas=sig,
        final=z32,
        plan=plan,
        seed=int(seed),
        policy_version=int(policy_version),
        cond=dict(cond or {}),
        prompts=list(prompts) if prompts is not None else [""] * int(noise.shape[0]),
        meta=dict(meta or {}),
    )
