"""Guidance: how a backbone's conditional and negative branches combine into the one velocity the sampler uses.

Why this is one function: the gradient that reaches the weights depends on *how* the branches are combined
(algorithms.md 2.5). With true CFG, v = v_neg + g (v_cond - v_neg). The FlowBP configs run the negative branch
under `no_grad` on a detached input (`detach_negative=True`), so d v / d theta = g * d v_cond / d theta and the
negative branch keeps no graph (half the activation memory of a re-forward). Guidance-distilled models (FLUX.1)
have no negative branch: the scale goes into the model as its `guidance` embedding. Every backbone calls
`guided_velocity`, so the three policies are implemented (and tested) once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Protocol

import torch

from flowbp_core.errors import ConfigError

GUIDANCE_MODES = ("true", "distilled", "none")
GuidanceMode = Literal["true", "distilled", "none"]


@dataclass(frozen=True)
class GuidanceConfig:
    """mode: "true" (two branches, v_neg + g (v_cond - v_neg)), "distilled" (one branch with guidance=g passed to
    the model) or "none" (one branch, no guidance). `detach_negative` only matters for "true"."""

    mode: GuidanceMode = "true"
    scale: float = 1.0
    detach_negative: bool = True

    def __post_init__(self) -> None:
        if self.mode not in GUIDANCE_MODES:
            raise ConfigError("guidance.mode", self.mode, f"one of {list(GUIDANCE_MODES)}")
        if not isinstance(self.scale, (int, float)) or not float(self.scale) == float(self.scale):
            raise ConfigError("guidance.scale", self.scale, "a finite number")
        if self.mode != "none" and not float(self.scale) > 0:
            raise ConfigError("guidance.scale", self.scale, "a value > 0")
        object.__setattr__(self, "scale", float(self.scale))

    @property
    def needs_negative(self) -> bool:
        """True CFG at g == 1 reduces to v_cond exactly, so the negative forward is skipped (as diffusers does)."""
        return self.mode == "true" and self.scale != 1.0


class BranchForward(Protocol):
    """One model forward. `branch` is "cond" or "neg"; `distilled_scale` is the guidance embedding value for
    guidance-distilled models and None otherwise."""

    def __call__(self, x: torch.Tensor, branch: str, distilled_scale: float | None) -> torch.Tensor: ...


def guided_velocity(forward: BranchForward | Callable[..., torch.Tensor], x: torch.Tensor,
                    guidance: GuidanceConfig,
                    forward_pair: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
                    ) -> torch.Tensor:
    """Combine the branches of `forward` at state `x` as `guidance` prescribes (see module docstring).

    `forward_pair(x) -> (v_cond, v_neg)`, when given, runs both branches as one doubled batch; it is used only
    where no graph is being built (the rollout), because that is where one launch instead of two pays (batch-1
    sampling is launch-bound) and where a shared graph could not leak gradient into the negative branch.
    """
    if guidance.mode == "distilled":
        return forward(x, "cond", guidance.scale)
    if forward_pair is not None and guidance.needs_negative and not torch.is_grad_enabled():
        v_cond, v_neg = forward_pair(x)
        return v_neg + guidance.scale * (v_cond - v_neg)
    v_cond = forward(x, "cond", None)
    if not guidance.needs_negative:
        return v_cond
    if guidance.detach_negative:
        # The input is detached too: with a straight-through or bridged state, a gradient could otherwise reach
        # earlier states through the negative branch even though its weights are frozen here.
        with torch.no_grad():
            v_neg = forward(x.detach(), "neg", None)
    else:
        v_neg = forward(x, "neg", None)
    return v_neg + guidance.scale * (v_cond - v_neg)
