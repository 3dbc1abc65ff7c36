"""Fixtures of the deployment tests: the chart rendered with each shipped values file (once per session)."""

from __future__ import annotations

import pytest
from deploy_helpers import load_values, render_docs


@pytest.fixture(scope="session")
def default_docs() -> list[dict]:
    return render_docs(None)


@pytest.fixture(scope="session")
def gpu_docs() -> list[dict]:
    return render_docs(load_values("values-gpu.yaml"))


@pytest.fixture(scope="session", params=["values.yaml", "values-gpu.yaml"])
def rendered(request) -> tuple[str, list[dict]]:
    values = None if request.param == "values.yaml" else load_values(request.param)
    return request.param, render_docs(values)


@pytest.fixture(scope="session")
def reward_docs() -> list[dict]:
    """GPU values with the (opt-in) reward RayService turned on."""
    values = load_values("values-gpu.yaml")
    values["rewardService"]["enabled"] = True
    return render_docs(values)
