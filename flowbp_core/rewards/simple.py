"""Weight-free rewards: saturation, contrast, sharpness. Prompt-independent, smooth, cheap.

Useful as sanity rewards (an optimiser that cannot raise saturation is broken), as regularisers in a Panel
(e.g. a negative sharpness weight against high-frequency reward hacking), and in CPU tests.
Every formula is smooth where images live: a small eps inside each square root keeps the gradient finite on flat
(grey, constant) images, where sqrt would otherwise have an infinite slope.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowbp_core.rewards.base import check_batch, register

_EPS = 1e-8
# ITU-R BT.601 luma weights.
_LUMA = (0.299, 0.587, 0.114)


def luminance(images: Tensor) -> Tensor:
    w = torch.tensor(_LUMA, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images * w).sum(1, keepdim=True)


class _WeightFree(nn.Module):
    name = "weight_free"

    def forward(self, images: Tensor, prompts: list[str]) -> Tensor:
        check_batch(images, prompts, self.name)
        return self.score(images.float())

    def score(self, images: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


@register("saturation")
class Saturation(_WeightFree):
    """Mean over pixels of the per-pixel standard deviation across R, G, B (0 for grey; ~0.47 at most)."""

    name = "saturation"

    def score(self, images: Tensor) -> Tensor:
        var = images.var(dim=1, unbiased=False)
        return torch.sqrt(var + _EPS).mean(dim=(1, 2))


@register("contrast")
class Contrast(_WeightFree):
    """RMS contrast: the standard deviation of the luminance over the image (0 for a flat image, 0.5 at most)."""

    name = "contrast"

    def score(self, images: Tensor) -> Tensor:
        y = luminance(images).flatten(1)
        return torch.sqrt(y.var(dim=1, unbiased=False) + _EPS)


@register("sharpness")
class Sharpness(_WeightFree):
    """Laplacian energy: mean squared response of the 3x3 Laplacian on the luminance (replicate-padded borders so
    that the image frame is not counted as an edge). Scale-free in the image size."""

    name = "sharpness"

    def __init__(self) -> None:
        super().__init__()
        k = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)
        self.register_buffer("kernel", k, persistent=False)

    def score(self, images: Tensor) -> Tensor:
        y = F.pad(luminance(images), (1, 1, 1, 1), mode="replicate")
        lap = F.conv2d(y, self.kernel.to(y.dtype))
        return lap.square().mean(dim=(1, 2, 3))
