"""What a training run keeps across steps: the per-(seed, step) seeds, the prompt batches, the EMA of the
weights, and the guard that fails a run after `max_bad_steps` skipped steps in a row. The step itself is
`flowbp_core.step`."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .errors import ConfigError

if TYPE_CHECKING:
    from .step import StepResult


class NonFiniteStreak(RuntimeError):
    """Raised when `max_bad_steps` steps in a row had a non-finite reward, loss or gradient; `reason` is the last
    step's skip reason (what the metrics count it under)."""

    def __init__(self, message: str, *, reason: str):
        super().__init__(message)
        self.reason = reason


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
                                  f"{result.skip_reason}); failing the run rather than training on garbage",
                                  reason=str(result.skip_reason))
