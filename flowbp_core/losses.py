"""Reward losses. The reference trains on the hinge ReLU(c - r) (c = 0.55): samples already above c get no
gradient. Per-sample weights (trajectory similarity, DRaFT-LV rows) are applied by `weighted_loss`."""

from __future__ import annotations

from typing import Callable

import torch

from flowbp_core.errors import ConfigError

LossFn = Callable[[torch.Tensor], torch.Tensor]


def hinge(rewards: torch.Tensor, clip: float = 0.55) -> torch.Tensor:
    """Per-sample ReLU(clip - r)."""
    return torch.relu(clip - rewards)


def neg_mean(rewards: torch.Tensor) -> torch.Tensor:
    """Per-sample -r (its mean is the negative mean reward)."""
    return -rewards


def weighted_loss(per_sample: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """mean_b w_b * loss_b with w detached (weights scale the gradient, they are not optimised)."""
    if per_sample.dim() != 1:
        raise ValueError(f"per-sample loss must be 1-D [B], got shape {tuple(per_sample.shape)}")
    if weights is None:
        return per_sample.mean()
    if weights.shape != per_sample.shape:
        raise ValueError(f"weights shape {tuple(weights.shape)} != per-sample loss shape {tuple(per_sample.shape)}")
    return (weights.detach().to(per_sample.dtype) * per_sample).mean()


def scaled(loss: LossFn, factor: float) -> LossFn:
    """`loss` times a constant (the CFG gradient compensation 1/g); factor 1 returns `loss` itself."""
    if factor == 1.0:
        return loss
    return lambda r: factor * loss(r)


_LOSSES = {"hinge": hinge, "neg_mean": neg_mean}


def loss_names() -> list[str]:
    return sorted(_LOSSES)


def build_loss(name: str, **kw) -> LossFn:
    """A per-sample loss of rewards by name: `hinge` (kw: clip) or `neg_mean`."""
    if name not in _LOSSES:
        raise ConfigError("reward.loss", name, f"one of {loss_names()}")
    if name == "hinge":
        clip = float(kw.pop("clip", 0.55))
        if kw:
            raise ConfigError(f"reward.loss.{next(iter(kw))}", kw[next(iter(kw))], "only 'clip' for hinge")
        return lambda r: hinge(r, clip)
    if kw:
        raise ConfigError(f"reward.loss.{next(iter(kw))}", kw[next(iter(kw))], "no parameters for neg_mean")
    return neg_mean
