"""Gradient-path methods: FlowBP-Sparse/-Bridge/-Lagrange, LeapAlign, ReFL, DRTune, DRaFT-LV on one surrogate
engine, and the chained references DRaFT-K, AlignProp, full BPTT. See README.md in this folder."""

from flowbp_core.methods import chain as _chain  # noqa: F401  (registers)
from flowbp_core.methods import posterior as _posterior  # noqa: F401
from flowbp_core.methods import surrogate as _surrogate  # noqa: F401
from flowbp_core.methods.base import Diagnostics, Endpoint, Method, Plan, SegmentPlan
from flowbp_core.methods.registry import build, names, register
from flowbp_core.methods.surrogate import SurrogateMethod, SurrogateParams

__all__ = [
    "Diagnostics", "Endpoint", "Method", "Plan", "SegmentPlan", "SurrogateMethod", "SurrogateParams",
    "build", "names", "register",
]
