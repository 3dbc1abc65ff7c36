"""Backbones: one adapter per model family behind the `Backbone` protocol (see README.md in this folder)."""

from flowbp_core.backbones.base import (Backbone, BackbonePreset, LoRAConfig, TextEncoder, build, build_kwargs, get,
                                        names, register)

__all__ = ["Backbone", "BackbonePreset", "LoRAConfig", "TextEncoder", "build", "build_kwargs", "get", "names",
           "register"]
