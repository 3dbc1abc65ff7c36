"""Method registry: the code that chooses a method never imports the code it chooses between.

`register(name)` decorates a factory `factory(backbone: str | None, **overrides) -> Method`. `build` resolves the
backbone alias, rejects unknown names with ConfigError, and hands the overrides to the factory, which merges
them over the backbone's preset and validates them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, TypeVar

from flowbp_core.errors import ConfigError

_REGISTRY: dict[str, Callable[..., Any]] = {}

BACKBONE_PRESETS = ("sd35", "flux1", "flux2")

F = TypeVar("F", bound=Callable[..., Any])


def register(name: str) -> Callable[[F], F]:
    def deco(factory: F) -> F:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return deco


def names() -> list[str]:
    return sorted(_REGISTRY)


def resolve_backbone(backbone: str | None) -> str | None:
    """A preset name (or None) as is; a backbone registry name -> the preset its family declares."""
    if backbone is None or backbone in BACKBONE_PRESETS:
        return backbone
    from flowbp_core.backbones.base import method_preset_of

    try:
        return method_preset_of(backbone)
    except ConfigError:
        raise ConfigError("backbone", backbone, f"one of {[None, *BACKBONE_PRESETS, 'sd3', 'embedded']}") from None


def build(name: str, backbone: str | None = None, **overrides: Any):
    if name not in _REGISTRY:
        raise ConfigError("method.name", name, f"one of {names()}")
    return _REGISTRY[name](resolve_backbone(backbone), **overrides)


P = TypeVar("P")


def make_params(cls: type[P], preset: dict[str, Any], overrides: dict[str, Any]) -> P:
    """Params dataclass from preset then overrides; an unknown key is a ConfigError naming it and the known ones."""
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key, value in overrides.items():
        if key not in known:
            raise ConfigError(f"method.{key}", value, f"a parameter of this method: one of {sorted(known)}")
    merged = {**preset, **overrides}
    for key in ("dirichlet", "trunc_range"):  # lists from YAML / JSON become the tuples the params hold
        value = merged.get(key)
        if value is not None:
            if not isinstance(value, (list, tuple)) or any(isinstance(x, bool) or not isinstance(x, (int, float))
                                                           for x in value):
                raise ConfigError(f"method.{key}", value, "a list of numbers")
            merged[key] = tuple(float(x) for x in value)
    params = cls(**merged)
    validate = getattr(params, "validate", None)
    if validate is not None:
        validate()
    return params
