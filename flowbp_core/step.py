"""One training step, from prompts to update: the only place a FlowBP step is written.

    plan  = step_plan(method, n_steps, seed, step)          # drawn once, by whoever issues the rollout
    cache = rollout_step(backbone=..., plan=plan, ...)      # no grad; the cache carries the plan
    result = learn_step(cache, comp, ..., reducer=...)      # endpoint -> reward -> loss -> backward -> update

The single-process loop (`run.train_loop`), the Ray rollout worker (`services/runtime/rollout.py`) and the Ray
learner ranks (`services/runtime/learner.py`) all call these; a `Reducer` (flowbp_core.reducers) is all that
differs between one process, data-parallel ranks and FSDP. Noise and plan derive from (seed, step), so every
rank, every retry and a resumed run sample the same step.

A step whose reward, loss or gradient is not finite is skipped on every rank, not applied: the parameters and
optimizer state stay exactly as they were, the caller counts it (`training.BadStepGuard`), and a poisoned step
never reaches a checkpoint because nothing of it is applied.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch

from .anchor import BaseAnchor
from .cache import TrajectoryCache
from .losses import weighted_loss
from .plan import Plan
from .reducers import NoReduce, Reducer
from .sampling import micro_batched, rollout
from .stages import BACKWARD, REWARD, SURROGATE, UPDATE, timed
from .training import EMA, derive_seed, generator_for

if TYPE_CHECKING:
    from .run import RunComponents

ScoreFn = Callable[[torch.Tensor, list[str]], torch.Tensor]
"""latents [B, ...] + prompts -> rewards [B]; differentiable w.r.t. the latents (decode is inside)."""


def step_plan(method: Any, n_steps: int, seed: int, step: int) -> Plan:
    """Step `step`'s plan, from (seed, step): the issuer of the rollout draws it once and the cache carries it."""
    return method.plan(n_steps, generator_for(seed, step, "plan"))


def step_noise(backbone: Any, seed: int, step: int, total: int, offset: int = 0, rows: int | None = None):
    """Rows [offset, offset + rows) of step `step`'s noise for its whole batch of `total`: a shard of the batch
    gets exactly the rows the whole batch would, however many workers share the step."""
    full = torch.randn(backbone.latent_shape(total), generator=generator_for(seed, step, "noise"))
    return full[offset:offset + (total if rows is None else rows)]


@torch.no_grad()
def rollout_step(*, backbone: Any, guidance: Any, plan: Plan, prompts: list[str], seed: int, step: int,
                 policy_version: int, state_dtype: torch.dtype, device: torch.device, offset: int = 0,
                 total: int | None = None, meta: dict[str, str] | None = None,
                 micro_batch: int | None = None, static: bool = False) -> TrajectoryCache:
    """Prompts -> conditioning -> step `step`'s no-grad trajectory, kept for `plan` and carrying it.

    `prompts` are rows [offset, offset + len(prompts)) of the step's batch of `total` (default: the whole batch).
    States and velocities are cached in `state_dtype` (the model dtype: bf16 on GPU). The transformer sees
    `micro_batch` samples at a time (None: all of them; `static`: always as many, see `micro_batched`); the Euler
    loop runs over the whole batch."""
    cond = backbone.encode_prompts(prompts)
    noise = step_noise(backbone, seed, step, total or len(prompts), offset, len(prompts)).to(device)
    velocity = micro_batched(lambda c: backbone.bind(c, guidance), cond, len(prompts), micro_batch, static=static)
    return rollout(velocity, noise, backbone.schedule(plan.n_steps).sigmas,
                   seed=derive_seed(seed, step, "noise"), policy_version=policy_version, cond=cond,
                   prompts=list(prompts), plan=plan, state_dtype=state_dtype, meta=meta)


@dataclass(frozen=True, kw_only=True)
class StepResult:
    """One learner step as this rank saw it (loss and reward are the group's means).

    Attributes:
        step (int): the step index (0-based).
        loss (float): the weighted loss, averaged over ranks.
        reward_mean (float): the mean reward of the endpoint rows, averaged over ranks.
        rewards (list[float]): this rank's per-row rewards [rows] (rows = B, or B*(1+n) for DRaFT-LV).
        grad_norm (float): the global gradient norm before clipping (nan when the step stopped before backward).
        skipped (bool): nothing was applied (a non-finite reward, loss or gradient on some rank).
        skip_reason (str | None): non_finite_reward | non_finite_loss | non_finite_on_other_rank |
            non_finite_gradient; None when applied.
        policy_version (int): the version of the weights that sampled the cache.
        n_samples (int): this rank's endpoint rows.
        diagnostics (dict[str, Any]): the method's gradient-path facts (active steps, residuals, grad_norm, ...).
        timings (dict[str, float]): seconds per stage (flowbp_core.stages), the caller's stages included.
    """

    step: int
    loss: float
    reward_mean: float
    rewards: list[float]
    grad_norm: float
    skipped: bool
    skip_reason: str | None
    policy_version: int
    n_samples: int
    diagnostics: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def learn_step(cache: TrajectoryCache, comp: RunComponents, *, step: int, optimizer: torch.optim.Optimizer,
               ema: EMA | None = None, score: ScoreFn | None = None, reducer: Reducer | None = None,
               timings: dict[str, float] | None = None) -> StepResult:
    """One update from one cache: endpoint of `cache.plan` -> score -> loss -> (every rank finite?) -> backward ->
    combine gradients (`reducer`) -> (finite?) -> clip -> optimizer -> EMA.

    `score(latents, prompts)` decodes and scores (default: `comp.score_fn()`, colocated) or asks the reward
    service. `timings` holds the caller's stages so far (rollout, transfer); the result's timings extend it."""
    reducer = reducer or NoReduce()
    timings = {} if timings is None else timings
    params = comp.backbone.trainable_parameters()
    cache = cache.to(comp.device)
    with timed(SURROGATE, timings):
        optimizer.zero_grad(set_to_none=True)
        velocity = comp.backbone.bind(cache.cond, comp.guidance)
        anchor = BaseAnchor(comp.backbone, velocity) if comp.cfg.train.velocity_penalty else None
        endpoint = comp.method.endpoint(cache, anchor or velocity)
    with timed(REWARD, timings):
        prompts = [cache.prompts[int(i)] for i in endpoint.sample_index.tolist()]
        rewards = (score or comp.score_fn())(endpoint.value, prompts)
    loss = weighted_loss(comp.loss_fn(rewards), endpoint.weights.to(rewards.device))
    if anchor is not None:
        penalty = anchor.penalty(loss.device)
        endpoint.diagnostics.extra["velocity_penalty"] = float(penalty.detach())
        loss = loss + comp.cfg.train.velocity_penalty * penalty
    reason = ("non_finite_reward" if not bool(torch.isfinite(rewards.detach()).all())
              else "non_finite_loss" if not bool(torch.isfinite(loss.detach()).all()) else None)
    # every rank decides together before backward, which is a collective under FSDP
    ok, loss_mean, reward_mean = reducer.agree(reason is None, float(loss.detach()),
                                               float(rewards.detach().float().mean()))
    if reason is None and not ok:
        reason = "non_finite_on_other_rank"
    grad_norm = float("nan")
    diag = _summarise_diagnostics(endpoint.diagnostics)
    if reason is None:
        with timed(BACKWARD, timings):
            loss.backward()
            grad_norm = reducer.gradients(params)
        if not math.isfinite(grad_norm):
            reason = "non_finite_gradient"
        else:
            endpoint.diagnostics.grad_norm = diag["grad_norm"] = grad_norm
    if reason is None:
        with timed(UPDATE, timings):
            apply_update(params, optimizer, comp.cfg.train.grad_clip, ema)
    else:
        optimizer.zero_grad(set_to_none=True)
    rewards_list = [float(r) for r in rewards.detach().float().cpu()]
    return StepResult(step=step, loss=loss_mean, reward_mean=reward_mean, rewards=rewards_list, grad_norm=grad_norm,
                      skipped=reason is not None, skip_reason=reason, policy_version=cache.policy_version,
                      n_samples=len(rewards_list), diagnostics=diag, timings=timings)


def apply_update(params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer, grad_clip: float | None,
                 ema: EMA | None) -> None:
    """The tail of every applied step: clip the gradient, step the optimizer, move the EMA."""
    if grad_clip is not None and any(p.grad is not None for p in params):
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if ema is not None:
        ema.update()


def _summarise_diagnostics(diag: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"active": list(getattr(diag, "active", []) or [])}
    if getattr(diag, "anchors", None) is not None:
        out["anchors"] = list(diag.anchors)
    for name in ("residual_j", "residual_0"):
        val = getattr(diag, name, None)
        if val is not None:
            out[name] = float(torch.as_tensor(val).float().mean())
    out["jacobian_factors"] = int(getattr(diag, "jacobian_factors", 0))
    out.update({k: float(v) for k, v in (getattr(diag, "extra", None) or {}).items()})
    return out
