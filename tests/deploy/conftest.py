"""Fixtures of the deployment tests: the chart rendered with each shipped values file (once per session)."""

from __future__ import annotations

import pytest
from deploy_helpers import load_values, one_gpu_values, render_docs


@pytest.fixture(scope="session")
def default_docs() -> list[dict]:
    return render_docs(None)


@pytest.fixture(scope="session")
def gpu_docs() -> list[dict]:
    return render_docs(load_values("values-gpu.yaml"))


@pytest.fixture(scope="session")
def one_gpu_docs() -> list[dict]:
    return render_docs(one_gpu_values())


@pytest.fixture(scope="session", params=["values.yaml", "values-gpu.yaml", "values-one-gpu.yaml"])
def rendered(request) -> tuple[str, list[dict]]:
    layered = {"values.yaml": lambda: None, "values-one-gpu.yaml": one_gpu_values}  # the rest stand alone
    values = layered.get(request.param, lambda: load_values(request.param))()
    return request.param, render_docs(values)


@pytest.fixture(scope="session")
def reward_docs() -> list[dict]:
    """GPU values with the (opt-in) reward RayService turned on."""
    values = load_values("values-gpu.yaml")
    values["rewardService"]["enabled"] = True
    return render_docs(values)
