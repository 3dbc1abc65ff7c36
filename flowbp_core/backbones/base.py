"""The Backbone seam: the protocol every model family implements, its small typed configs, and the registry.

The runtime, the methods and the world code only ever talk to a `Backbone` (docs/interfaces.md). Adding a family
is one new module that calls `@register("name")`; the code that picks a backbone by name never imports the
families it chooses between (`build` imports the module lazily).
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Protocol, runtime_checkable

import torch

from flowbp_core.errors import ConfigError
from flowbp_core.guidance import GuidanceConfig
from flowbp_core.schedules import Schedule

METHOD_PRESETS = ("sd35", "flux1", "flux2")


@dataclass(frozen=True)
class LoRAConfig:
    """LoRA settings handed to peft. `target_modules=None` means the family's default attention projections.

    `alpha` defaults to `rank` (scale 1). Adapter weights are kept in float32 even on a bf16 base, because
    low-rank updates at lr 1e-5 vanish in bf16's 8-bit mantissa.
    """

    rank: int = 16
    alpha: float | None = None
    target_modules: tuple[str, ...] | None = None
    dropout: float = 0.0
    init: str = "gaussian"  # peft `init_lora_weights`: B = 0, so a fresh adapter leaves the model unchanged

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError("lora.rank", self.rank, "an integer >= 1")
        if self.alpha is not None and not float(self.alpha) > 0:
            raise ConfigError("lora.alpha", self.alpha, "a value > 0 (or None for alpha = rank)")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ConfigError("lora.dropout", self.dropout, "a value in [0, 1)")
        if self.target_modules is not None:
            mods = tuple(self.target_modules)
            if not mods or not all(isinstance(m, str) and m for m in mods):
                raise ConfigError("lora.target_modules", self.target_modules, "a non-empty list of module names")
            object.__setattr__(self, "target_modules", mods)

    @property
    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class BackbonePreset:
    """What a family samples with by default, and which of the paper's per-backbone method presets it uses
    (`flowbp_core.methods.build(name, backbone=preset.method_preset)`).

    `n_steps` is the default of sampling outside a run (`schedule(None)`, `world/evaluate.py`); a run samples
    with `sampling.n_steps`, which always has a value (25 unless set), so the run config wins."""

    method_preset: str
    n_steps: int = 25
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    resolution: int = 512

    def __post_init__(self) -> None:
        if self.method_preset not in METHOD_PRESETS:
            raise ConfigError("preset.method_preset", self.method_preset, f"one of {list(METHOD_PRESETS)}")


@runtime_checkable
class TextEncoder(Protocol):
    """Anything that turns prompts into (token states [B, T, D], pooled [B, P] or None). Frozen: runs no_grad."""

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]: ...


@runtime_checkable
class Backbone(Protocol):
    """The contract of docs/interfaces.md. Latents are always spatial [B, C, h, w] tensors in the space the
    sampler integrates in (FLUX packing happens inside `velocity`), so states, rewards on latents and the
    straight-through pin look the same for every family."""

    name: str
    preset: BackbonePreset

    def latent_shape(self, batch: int) -> tuple[int, ...]: ...

    def schedule(self, n_steps: int) -> Schedule: ...

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]: ...

    def velocity(self, x: torch.Tensor, sigma: float, cond: dict[str, torch.Tensor],
                 guidance: GuidanceConfig) -> torch.Tensor: ...

    def bind(self, cond: dict[str, torch.Tensor],
             guidance: GuidanceConfig | None = None) -> Callable[[torch.Tensor, float], torch.Tensor]: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...

    def trainable_parameters(self) -> list[torch.nn.Parameter]: ...

    def apply_lora(self, cfg: LoRAConfig) -> None: ...

    def enable_gradient_checkpointing(self) -> None: ...

    def trainable_state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_trainable_state_dict(self, sd: dict[str, torch.Tensor]) -> None: ...

    def export(self, path: str) -> Any: ...


# ----------------------------------------------------------------------------------------------- registry
_REGISTRY: dict[str, type] = {}
# Families shipped with the project, imported only when asked for by name.
_BUILTIN_MODULES = {
    "sd3": "flowbp_core.backbones.sd3",
    "flux1": "flowbp_core.backbones.flux1",
    "flux2": "flowbp_core.backbones.flux2",
    "embedded": "flowbp_core.backbones.embedded",
}


def eval_schedule(backbone: Any, n_steps: int) -> Schedule:
    """The schedule evaluation samples with: the family's pipeline spacing where it differs from training's."""
    own = getattr(backbone, "eval_schedule", None)
    return own(n_steps) if own is not None else backbone.schedule(n_steps)


def register(name: str) -> Callable[[type], type]:
    """Class decorator: make a backbone family buildable by `name`."""

    def deco(cls: type) -> type:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"backbone name {name!r} is already registered to {_REGISTRY[name].__qualname__}")
        _REGISTRY[name] = cls
        return cls

    return deco


def _load_builtin(name: str) -> None:
    mod = _BUILTIN_MODULES.get(name)
    if mod is not None and name not in _REGISTRY:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:  # a real missing dependency inside the module: report it, don't hide it
                raise


def names() -> list[str]:
    """Every backbone name that `build` accepts."""
    for n in _BUILTIN_MODULES:
        _load_builtin(n)
    return sorted(_REGISTRY)


def get(name: str) -> type:
    _load_builtin(name)
    if name not in _REGISTRY:
        raise ConfigError("backbone.name", name, f"one of {names()}")
    return _REGISTRY[name]


def method_preset_of(name: str) -> str | None:
    """The paper method preset backbone `name` follows: its family module's `PRESET.method_preset`, the one
    mapping that `RunConfig.method_preset()` and `methods.build(..., backbone=name)` both read. None for a
    family registered without a module-level `PRESET`."""
    preset = getattr(importlib.import_module(get(name).__module__), "PRESET", None)
    return preset.method_preset if preset is not None else None


def build_kwargs(*, tiny: bool, path: str | None, local_files_only: bool, dtype: Any, device: Any,
                 **extra: Any) -> dict[str, Any]:
    """The keywords of `build(name, path, tiny=tiny, ...)`: dtype and device, `local_files_only` for a pretrained
    folder or hub id (a tiny or default model reads none), and each `extra` keyword that is not None (seed,
    text_encoders, height, width)."""
    kw: dict[str, Any] = {"dtype": dtype, "device": device}
    if not tiny and path is not None:
        kw["local_files_only"] = local_files_only
    return kw | {k: v for k, v in extra.items() if v is not None}


def build(name: str, path: str | None = None, *, tiny: bool = False, **kw: Any) -> Any:
    """Build backbone `name`: from a hub id or local folder (`path`), or tiny random weights (`tiny=True`, for
    tests; `seed=` picks them). Extra keywords go to `from_pretrained` / `tiny` (dtype, device, ...)."""
    cls = get(name)
    if path is not None and tiny:
        raise ConfigError("backbone.tiny", tiny, "False when backbone.path is given (one source only)")
    if tiny:
        return cls.tiny(**kw)
    if path is None:
        default = getattr(cls, "default", None)
        if default is None:
            raise ConfigError("backbone.path", None, f"a hub id or a local pipeline folder for backbone {name!r}")
        return default(**kw)
    return cls.from_pretrained(path, **kw)
