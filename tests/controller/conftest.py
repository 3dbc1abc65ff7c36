"""Fixtures of the controller tests: the token in the environment and an in-process app on the real Redis."""

from __future__ import annotations

import pytest

from controller_helpers import TOKEN, settings_for


@pytest.fixture
def token_env(monkeypatch):
    monkeypatch.setenv("FLOWBP_TEST_TOKENS", TOKEN)


@pytest.fixture
def api(redis_server, tmp_path, token_env):
    """An in-process app on the real Redis (no reconciler, Ray unreachable): the API surface alone."""
    from fastapi.testclient import TestClient

    from services.controller.app import create_app

    app = create_app(settings_for(redis_server.url, tmp_path))
    with TestClient(app) as client:
        client.app_state = app.state
        yield client
