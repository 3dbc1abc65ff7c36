"""The velocity penalty to the base: a trust region that keeps an aligned LoRA near the model it started from.

Every velocity the surrogate re-forwards with gradient is also computed by the base model (the LoRA switched
off, no gradient) at the same input; the penalty is the mean squared difference over those calls,

    P = mean_m || v_theta(x_m, s_m) - v_base(x_m, s_m) ||^2,      loss = reward loss + lambda * P,

which for flow matching is, up to a factor, the KL of the two models' path measures restricted to the active
steps. It costs one no-grad forward per re-forward and adds no Jacobian to any gradient path: the base velocity
is a constant, and x_m is detached for it.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

VelocityFn = Callable[[torch.Tensor, float], torch.Tensor]


@contextmanager
def adapters_off(backbone: Any) -> Iterator[None]:
    """The base model: the backbone's LoRA adapters disabled for the block, whatever the block raises."""
    model = backbone.transformer
    model.disable_adapters()
    try:
        yield
    finally:
        model.enable_adapters()


class BaseAnchor:
    """A velocity function that also keeps, for each call with gradient, its squared distance to the base's."""

    def __init__(self, backbone: Any, velocity: VelocityFn):
        if backbone.finetune_mode != "lora":
            raise ValueError(f"train.velocity_penalty needs backbone.finetune='lora' (the base is the model with its "
                             f"LoRA off), got finetune={backbone.finetune_mode!r}; set train.velocity_penalty=0")
        self.backbone, self.velocity = backbone, velocity
        self.terms: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        v = self.velocity(x, sigma)
        if torch.is_grad_enabled() and v.requires_grad:
            with torch.no_grad(), adapters_off(self.backbone):
                v_base = self.velocity(x.detach(), sigma)
            self.terms.append((v.float() - v_base.float()).pow(2).mean())
        return v

    def penalty(self, device: torch.device) -> torch.Tensor:
        """The mean squared velocity difference over the calls so far (0 when none carried gradient)."""
        if not self.terms:
            return torch.zeros((), device=device)
        return torch.stack([t.to(device) for t in self.terms]).mean()
