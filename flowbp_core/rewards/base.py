"""The Reward seam: a Protocol, a name registry, a frozen-module base class and a weighted Panel.

Importing this module loads no model and imports no transformers: the built-in rewards are registered lazily
(name -> module), and a module is imported only when its reward is built. Other packages (e.g. the world's
attribute reward) register their own factories with the `register` decorator.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from flowbp_core.errors import ConfigError


@runtime_checkable
class Reward(Protocol):
    """A differentiable score of images given prompts.

    `__call__(images [B,3,H,W] in [0,1], prompts: list[str]) -> Tensor[B]` (float32), differentiable w.r.t.
    `images`. Weights are frozen: the gradient only flows to the pixels.
    """

    name: str

    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor: ...


# name -> factory (a class or a function taking keyword arguments and returning a Reward)
_REGISTRY: dict[str, Callable[..., Reward]] = {}

# Built-in rewards, imported on first use so that `import flowbp_core.rewards` stays cheap (no transformers).
_BUILTIN: dict[str, str] = {
    "hpsv2": "flowbp_core.rewards.hpsv2",
    "pickscore": "flowbp_core.rewards.pickscore",
    "clipscore": "flowbp_core.rewards.clipscore",
    "aesthetic": "flowbp_core.rewards.aesthetic",
    "imagereward": "flowbp_core.rewards.imagereward",
    "saturation": "flowbp_core.rewards.simple",
    "contrast": "flowbp_core.rewards.simple",
    "sharpness": "flowbp_core.rewards.simple",
    "efficientnet": "flowbp_core.rewards.efficientnet",
}

# Packages outside rewards/ that register rewards on import. Tried (once) when a name is not yet known, so that
# `build("world_attributes")` works without the caller importing the world package first.
_PLUGIN_MODULES: tuple[str, ...] = ("flowbp_core.world",)
_plugins_loaded = False


def register(name: str) -> Callable[[Callable[..., Reward]], Callable[..., Reward]]:
    """Decorator: `@register("my_reward")` on a Reward class or factory function."""

    def deco(factory: Callable[..., Reward]) -> Callable[..., Reward]:
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not factory:
            # Re-importing the same module (e.g. importlib.reload) re-registers a new object of the same
            # qualified name; only a genuinely different factory under an existing name is an error.
            if getattr(existing, "__qualname__", None) != getattr(factory, "__qualname__", None):
                raise ValueError(f"reward name {name!r} is already registered to {existing!r}")
        _REGISTRY[name] = factory
        return factory

    return deco


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for mod in _PLUGIN_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            # Only "that package is not there" is fine; a broken import inside it must surface.
            if e.name is None or not mod.startswith(e.name):
                raise


def names() -> list[str]:
    """Every reward name `build` accepts (built-ins, registered ones, and plugins)."""
    _load_plugins()
    return sorted(set(_REGISTRY) | set(_BUILTIN))


def build(name: str, **kwargs) -> Reward:
    """Build the reward registered as `name` with the factory's keyword arguments.

    Raises ConfigError (naming the known rewards) for an unknown name.
    """
    if name not in _REGISTRY and name in _BUILTIN:
        importlib.import_module(_BUILTIN[name])
    if name not in _REGISTRY:
        _load_plugins()
    if name not in _REGISTRY:
        raise ConfigError("reward.name", name, "one of " + ", ".join(names()))
    return _REGISTRY[name](**kwargs)


def require_file(path: str | Path, what: str) -> Path:
    """Return `path` as a Path, or raise FileNotFoundError naming the file expected and what it is for."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(
            f"{what}: expected a file at {str(p)!r}, found {'a folder' if p.is_dir() else 'nothing'}")
    return p


def require_dir(path: str | Path, what: str, must_contain: Sequence[str] = ("config.json",)) -> Path:
    """Return `path` as a Path, or raise FileNotFoundError naming the folder and the files expected in it."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"{what}: expected a folder at {str(p)!r} (with {', '.join(must_contain)}), "
                                f"found {'a file' if p.is_file() else 'nothing'}")
    missing = [m for m in must_contain if not (p / m).exists()]
    if missing:
        raise FileNotFoundError(f"{what}: the folder {str(p)!r} has no {', '.join(missing)}")
    return p


class FrozenReward(nn.Module):
    """Base class for rewards with weights: frozen (requires_grad False), always in eval mode.

    `train()` is a no-op on purpose: the aesthetic and ImageReward heads hold Dropout layers, and a parent module's
    `.train()` would otherwise make the reward random.
    """

    name: str = "reward"

    def freeze(self) -> "FrozenReward":
        self.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True) -> "FrozenReward":  # noqa: ARG002 - see class docstring
        return super().train(False)

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        for b in self.buffers():
            return b.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        for p in self.parameters():
            return p.dtype
        return torch.float32


def check_batch(images: Tensor, prompts: Sequence[str], name: str) -> None:
    """Shape and range contract shared by all rewards; cheap, so always on."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{name}: images must be [B,3,H,W], got {tuple(images.shape)}")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{name}: {images.shape[0]} images but {len(prompts)} prompts")


class Panel(nn.Module):
    """A weighted sum of rewards, itself a Reward: r = sum_k w_k r_k(images, prompts).

    `components(images, prompts)` returns every term unweighted (for logging and the eval table).
    """

    def __init__(self, members: Sequence[tuple[Reward, float]], name: str = "panel"):
        super().__init__()
        if not members:
            raise ConfigError("reward.panel", [], "at least one (reward, weight) pair")
        seen: set[str] = set()
        for r, w in members:
            if not isinstance(r, Reward):
                raise ConfigError("reward.panel", r, "a Reward (callable with a `name`)")
            if r.name in seen:
                raise ConfigError("reward.panel", r.name, "distinct reward names in one panel")
            if not torch.isfinite(torch.tensor(float(w))):
                raise ConfigError(f"reward.panel.{r.name}.weight", w, "a finite number")
            seen.add(r.name)
        self.name = name
        self.weights = [float(w) for _, w in members]
        self.rewards = list(r for r, _ in members)
        # Register nn.Module members so .to(device) moves them with the panel.
        self._modules_list = nn.ModuleList([r for r in self.rewards if isinstance(r, nn.Module)])

    def components(self, images: Tensor, prompts: list[str]) -> dict[str, Tensor]:
        return {r.name: r(images, prompts) for r in self.rewards}

    def forward(self, images: Tensor, prompts: list[str]) -> Tensor:
        total = None
        for r, w in zip(self.rewards, self.weights):
            term = w * r(images, prompts).float()
            total = term if total is None else total + term
        return total

    def train(self, mode: bool = True) -> "Panel":  # noqa: ARG002 - members stay frozen
        return super().train(False)


def build_panel(spec: dict[str, float] | Sequence[tuple[str, float]], member_kwargs: dict[str, dict] | None = None
                ) -> Panel:
    """Panel from names and weights, e.g. `{"hpsv2": 1.0, "aesthetic": 0.1}`; per-name kwargs in member_kwargs."""
    items = list(spec.items()) if isinstance(spec, dict) else list(spec)
    member_kwargs = member_kwargs or {}
    return Panel([(build(n, **member_kwargs.get(n, {})), w) for n, w in items])
