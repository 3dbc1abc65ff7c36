"""The reward computation behind both deployments, as plain Python (no Serve), so it is testable on its own.

`RewardEngine.run(requests)` scores a list of requests (one Serve batch). Requests with the same input kind,
per-sample shape and grad wish are concatenated and scored together; with gradients, ONE backward of the summed
reward gives every sample's d r_b / d input_b at once, because sample b's reward depends on sample b's input only
(the rewards are per-sample; nothing in a frozen reward mixes the batch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from flowbp_core import rewards as reward_registry
from flowbp_core.errors import ConfigError
from services.reward_serve.protocol import RewardRequest, RewardResponse, WireError


@dataclass(frozen=True, kw_only=True)
class DecoderSpec:
    """Which backbone's VAE decodes latents on the reward side (`build(name, path, tiny=tiny, **kwargs)`).

    Attributes:
        backbone (str): the backbone family's registered name (e.g. "sd3").
        path (str | None): its pretrained folder or hub id; None builds it from config (tiny) or the default.
        tiny (bool): the tiny random-weight config (tests, CPU runs).
        kwargs (dict[str, Any]): further keyword arguments of the build (dtype, device, local_files_only).
    """

    backbone: str
    path: str | None = None
    tiny: bool = False
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class RewardServiceSpec:
    """Everything a reward replica needs to build itself.

    Attributes:
        panel (tuple[tuple[str, float], ...]): the reward terms as ((name, weight), ...); one entry with weight 1
            is a plain reward.
        reward_kwargs (dict[str, dict[str, Any]]): each term's constructor keyword arguments, by name.
        decoder (DecoderSpec | None): the VAE that decodes latent requests; None: the service takes images only.
        device (str): where the replica runs its models ("cpu" or "cuda").
        name (str): the deployment's name, returned in every response.
        max_batch_size (int): samples a replica scores in one call, >= 1.
        batch_wait_timeout_s (float): how long a replica waits to fill a batch, >= 0.
    """

    panel: tuple[tuple[str, float], ...]
    reward_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)
    decoder: DecoderSpec | None = None
    device: str = "cpu"
    name: str = "reward"
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.01

    def __post_init__(self) -> None:
        if not self.panel:
            raise ConfigError("reward.panel", self.panel, "at least one (name, weight) pair")
        if self.max_batch_size < 1:
            raise ConfigError("reward.serve.max_batch_size", self.max_batch_size, "an integer >= 1")
        if self.batch_wait_timeout_s < 0:
            raise ConfigError("reward.serve.batch_wait_timeout_s", self.batch_wait_timeout_s, "a value >= 0")


def build_reward(panel: tuple[tuple[str, float], ...], reward_kwargs: dict[str, dict[str, Any]] | None = None):
    """A single reward (weight 1) or a weighted Panel, from names."""
    kw = reward_kwargs or {}
    if len(panel) == 1 and float(panel[0][1]) == 1.0:
        return reward_registry.build(panel[0][0], **kw.get(panel[0][0], {}))
    return reward_registry.build_panel(list(panel), kw)


def build_decoder(spec: DecoderSpec | None, device: str = "cpu") -> Callable[[torch.Tensor], torch.Tensor] | None:
    if spec is None:
        return None
    from flowbp_core import backbones

    cls = backbones.get(spec.backbone)
    if not spec.tiny and spec.path is not None and hasattr(cls, "vae_decoder"):
        return cls.vae_decoder(spec.path, **spec.kwargs)  # the VAE alone: no transformer, no text encoders
    bb = backbones.build(spec.backbone, spec.path, tiny=spec.tiny, **spec.kwargs)
    for p in bb.trainable_parameters():
        p.requires_grad_(False)
    return bb.decode


class RewardEngine:
    def __init__(self, spec: RewardServiceSpec):
        self.spec = spec
        self.device = torch.device(spec.device)
        self.reward = build_reward(spec.panel, spec.reward_kwargs)
        if isinstance(self.reward, torch.nn.Module):
            self.reward.to(self.device)
        self.decode = build_decoder(spec.decoder, spec.device)

    def _images(self, x: torch.Tensor, kind: str) -> torch.Tensor:
        if kind == "images":
            return x
        if self.decode is None:
            raise WireError(f"deployment {self.spec.name!r} has no decoder: send kind='images', not latents")
        return self.decode(x)

    def run(self, requests: list[RewardRequest], allow_grad: bool = True) -> list[RewardResponse]:
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            key = (r.kind, tuple(r.input.shape[1:]), bool(r.want_grad and allow_grad))
            groups.setdefault(key, []).append(i)
        out: list[RewardResponse | None] = [None] * len(requests)
        for (kind, _, want_grad), idx in groups.items():
            x = torch.cat([requests[i].input for i in idx]).to(self.device, torch.float32)
            prompts = [p for i in idx for p in requests[i].prompts]
            if want_grad:
                x.requires_grad_(True)
                with torch.enable_grad():
                    r = self.reward(self._images(x, kind), prompts).float()
                    (g,) = torch.autograd.grad(r.sum(), x)
            else:
                with torch.no_grad():
                    r = self.reward(self._images(x, kind), prompts).float()
                g = None
            if r.shape != (x.shape[0],):
                raise RuntimeError(f"reward returned shape {tuple(r.shape)} for a batch of {x.shape[0]}")
            start = 0
            for i in idx:
                n = requests[i].batch_size
                out[i] = RewardResponse(rewards=r[start : start + n].detach().cpu(),
                                        grad=None if g is None else g[start : start + n].detach().cpu(),
                                        deployment=self.spec.name)
                start += n
        return out  # type: ignore[return-value]
