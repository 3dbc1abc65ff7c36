"""One learner step, and the single-process loop built from it.

`train_step` is the only place where a FlowBP update happens: the Ray learner, the single-process loop, the
demo and the benchmarks all call it, so the order of operations (endpoint -> score -> loss -> finite check ->
backward -> clip -> finite check -> optimizer -> EMA) is written once.

A step whose reward, loss or gradient is not finite is skipped, not applied: the parameters and optimizer
state are left exactly as they were, the caller counts it, and `max_bad_steps` in a row fail the run. A poisoned
step never reaches a checkpoint because nothing of it is applied.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from .cache import TrajectoryCache
from .errors import ConfigError
from .losses import weighted_loss
from .sampling import VelocityFn

ScoreFn = Callable[[torch.Tensor, list[str]], torch.Tensor]
"""latents [B, ...] + prompts -> rewards [B]; differentiable w.r.t. the latents (decode is inside)."""


class NonFiniteStreak(RuntimeError):
    """Raised when `max_bad_steps` steps in a row had a non-finite reward, loss or gradient."""


# ----------------------------------------------------------------------------------------- seeds & prompts
def derive_seed(base_seed: int, step: int, stream: str) -> int:
    """A stable 63-bit seed per (run seed, step, purpose): rollout noise and the active-set sampler of step t
    are the same on every rank and after a resume, with no sampler state to save."""
    digest = hashlib.blake2b(f"{base_seed}:{step}:{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def generator_for(base_seed: int, step: int, stream: str) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(base_seed, step, stream))


@dataclass
class PromptSampler:
    """Deterministic prompt batches: batch t is a function of (seed, t) only, so resume and every rank agree.

    Epochs are shuffled permutations; batch t takes positions [t*B, (t+1)*B) of the concatenated epochs."""

    prompts: list[str]
    batch_size: int
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ConfigError("train.prompts", self.prompts, "at least one prompt")
        if self.batch_size < 1:
            raise ConfigError("train.batch_size", self.batch_size, "an integer >= 1")

    def _epoch(self, e: int) -> list[int]:
        g = torch.Generator().manual_seed(derive_seed(self.seed, e, "prompt-epoch"))
        return torch.randperm(len(self.prompts), generator=g).tolist()

    def batch(self, step: int) -> list[str]:
        n = len(self.prompts)
        out = []
        for pos in range(step * self.batch_size, (step + 1) * self.batch_size):
            e, i = divmod(pos, n)
            out.append(self.prompts[self._epoch(e)[i]])
        return out


# ------------------------------------------------------------------------------------------------- EMA
class EMA:
    """Exponential moving average of the trainable parameters (kept in float32)."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        if not 0.0 <= decay < 1.0:
            raise ConfigError("train.ema_decay", decay, "a value in [0, 1)")
        self.decay = decay
        self.params = list(params)
        self.shadow = [p.detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        for s, p in zip(self.shadow, self.params):
            s.mul_(self.decay).add_(p.detach().float(), alpha=1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"ema.{i}": s for i, s in enumerate(self.shadow)}

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        for i, s in enumerate(self.shadow):
            s.copy_(sd[f"ema.{i}"])

    @torch.no_grad()
    def copy_to_params(self) -> None:
        for s, p in zip(self.shadow, self.params):
            p.copy_(s.to(p.dtype))


# ---------------------------------------------------------------------------------------------- the step
@dataclass
class StepResult:
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


def local_part(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a tensor: the local shard of a sharded one (a DTensor, under FSDP), else itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


def _summarise_diagnostics(diag: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if diag is None:
        return out
    out["active"] = list(getattr(diag, "active", []) or [])
    anchors = getattr(diag, "anchors", None)
    if anchors is not None:
        out["anchors"] = list(anchors)
    for name in ("residual_j", "residual_0"):
        val = getattr(diag, name, None)
        if val is not None:
            out[name] = float(torch.as_tensor(val).float().mean())
    out["jacobian_factors"] = int(getattr(diag, "jacobian_factors", 0))
    extra = getattr(diag, "extra", None) or {}
    out.update({k: float(v) for k, v in extra.items()})
    return out


def train_step(
    *,
    step: int,
    cache: TrajectoryCache,
    method: Any,
    velocity: VelocityFn,
    score: ScoreFn,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    params: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator | None = None,
    grad_clip: float | None = 1.0,
    ema: EMA | None = None,
    policy_version: int = 0,
    apply: bool = True,
    all_finite: Callable[[bool], bool] | None = None,
) -> StepResult:
    """One FlowBP update from one cache.

    `velocity` is the trainable model bound to the cache's conditioning (`backbone.bind(cache.cond, g)`);
    `score(latents, prompts)` decodes and scores (colocated) or asks the reward service (served).
    `loss_fn(rewards) -> per-sample loss` is a `flowbp_core.losses` loss; the endpoint's sample weights are applied
    by `weighted_loss`. With `apply=False` gradients are left in
    `.grad` (the caller all-reduces or inspects them) and no optimizer/EMA step is taken.
    `all_finite(this_rank_finite) -> every_rank_finite` (data-parallel ranks) makes all ranks agree on skipping
    before backward, which is a collective under FSDP that a rank skipping alone would never join.
    """
    t0 = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    endpoint = method.endpoint(cache, velocity, generator=generator)
    t1 = time.perf_counter()
    prompts = [cache.prompts[int(i)] for i in endpoint.sample_index.tolist()]
    rewards = score(endpoint.value, prompts)
    t2 = time.perf_counter()
    loss = weighted_loss(loss_fn(rewards), endpoint.weights.to(rewards.device))
    diag = _summarise_diagnostics(endpoint.diagnostics)
    reward_list = [float(r) for r in rewards.detach().float().cpu()]
    base = dict(step=step, rewards=reward_list, policy_version=policy_version, n_samples=len(reward_list),
                diagnostics=diag)

    def skipped(reason: str, grad_norm: float = float("nan")) -> StepResult:
        optimizer.zero_grad(set_to_none=True)
        return StepResult(loss=float(loss.detach()), reward_mean=float(rewards.detach().float().mean()),
                          grad_norm=grad_norm, skipped=True, skip_reason=reason,
                          timings={"surrogate": t1 - t0, "reward": t2 - t1}, **base)

    reason = ("non_finite_reward" if not _finite(rewards.detach())
              else "non_finite_loss" if not _finite(loss.detach()) else None)
    if all_finite is not None and not all_finite(reason is None) and reason is None:
        reason = "non_finite_on_other_rank"
    if reason is not None:
        return skipped(reason)
    loss.backward()
    t3 = time.perf_counter()
    # This rank's part of each gradient: under FSDP a gradient is a shard and the learner combines the ranks'
    # norms itself.
    grads = [local_part(p.grad) for p in params if p.grad is not None]
    if grads:
        grad_norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))
    else:
        grad_norm = 0.0
    if not math.isfinite(grad_norm):
        return skipped("non_finite_gradient", grad_norm)
    if endpoint.diagnostics is not None and hasattr(endpoint.diagnostics, "grad_norm"):
        endpoint.diagnostics.grad_norm = grad_norm
    diag["grad_norm"] = grad_norm
    if apply:
        if grad_clip is not None and grads:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update()
    t4 = time.perf_counter()
    return StepResult(loss=float(loss.detach()), reward_mean=float(rewards.detach().float().mean()),
                      grad_norm=grad_norm, skipped=False, skip_reason=None,
                      timings={"surrogate": t1 - t0, "reward": t2 - t1, "backward": t3 - t2, "optimizer": t4 - t3},
                      **base)


class BadStepGuard:
    """Counts non-finite steps in a row; raises NonFiniteStreak when the streak reaches `max_bad_steps`."""

    def __init__(self, max_bad_steps: int):
        self.max_bad_steps = max_bad_steps
        self.streak = 0
        self.total = 0

    def observe(self, result: StepResult) -> None:
        if not result.skipped:
            self.streak = 0
            return
        self.streak += 1
        self.total += 1
        if self.streak >= self.max_bad_steps:
            raise NonFiniteStreak(f"{self.streak} steps in a row were skipped (last at step {result.step}: "
                                  f"{result.skip_reason}); failing the run rather than training on garbage")
