"""Fixtures for tests/core (helpers live in core_helpers.py, a uniquely named module)."""

from __future__ import annotations

import pytest
import torch

from core_helpers import LinearField
from flowbp_core.sampling import rollout
from flowbp_core.schedules import make_schedule


@pytest.fixture
def linear_field():
    return LinearField()


@pytest.fixture
def make_cache():
    def make(field, n=12, batch=3, dim=5, dtype=torch.float64, kind="sd3", seed=0):
        noise = torch.randn(batch, dim, generator=torch.Generator().manual_seed(seed), dtype=dtype)
        return rollout(field, noise, make_schedule(kind, n).sigmas, seed=seed)

    return make
