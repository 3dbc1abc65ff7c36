"""`Telemetry.flush`: a process about to exit waits until the node's exporter shows its last values.

Against the session's real Ray head (it exports every 2 s): without the wait, a job's final eval score, set a
moment before its driver exits, never reaches Prometheus.
"""

from __future__ import annotations

import urllib.request
import uuid

import pytest

from services.localproc import free_port
from services.runtime import telemetry as T

pytestmark = pytest.mark.integration


def test_flush_returns_once_the_exporter_shows_every_last_value(ray_client):
    tel = T.Telemetry(f"flush-{uuid.uuid4().hex[:8]}")
    tel.eval(3, {"rater": 56.25, "judge": 71.5})
    tel.steps.inc(1, tags=tel.tags)
    tel.steps.inc(2, tags=tel.tags)
    tel.reward_mean.set(0.5, tags=tel.tags)
    tel.reward_mean.set(-0.125, tags=tel.tags)  # the last value is the one that must arrive

    assert tel.flush(timeout_s=120)
    exported = T._gauge_samples(urllib.request.urlopen(T._metrics_export_url(), timeout=10).read().decode())
    for key, value in {("flowbp_eval_score", (("metric", "judge"), ("run_id", tel.run_id))): 71.5,
                       ("flowbp_steps_total", (("run_id", tel.run_id),)): 3.0,
                       ("flowbp_reward_mean", (("run_id", tel.run_id),)): -0.125}.items():
        assert T._shown(exported, key, value), key
    assert not T._shown(exported, ("flowbp_reward_mean", (("run_id", tel.run_id),)), 0.5)


def test_flush_without_values_returns_at_once_and_an_unreadable_exporter_is_reported(ray_client, monkeypatch, caplog):
    tel = T.Telemetry(f"flush-{uuid.uuid4().hex[:8]}")
    assert tel.flush(timeout_s=0)  # nothing set, nothing to wait for
    tel.loss.set(1.0, tags=tel.tags)
    monkeypatch.setattr(T, "_metrics_export_url", lambda: f"http://127.0.0.1:{free_port()}/metrics")
    assert not tel.flush(timeout_s=60)  # connection refused: reported, not waited on
    assert "may not reach Prometheus" in caplog.text
