"""`ray job submit` of the training entrypoint against the session's local `ray start --head`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.waiting import wait_for

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def test_ray_job_submit_runs_the_entrypoint(ray_head, tmp_path):
    ray_bin = str(Path(sys.executable).with_name("ray"))
    entry = [sys.executable, "-m", "services.entrypoints.train", "--config", str(REPO / "deploy/configs/tiny.yaml"),
             f"--checkpoint.dir={tmp_path}", "--run_id=jobsubmit", "--train.steps=2",
             "--runtime.rollout_workers=1", "--eval.limit=1"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    job_id = f"flowbp-test-{uuid.uuid4().hex[:8]}"
    # --no-wait: the CLI returns once the job is accepted; the run itself is followed below with a deadline.
    proc = subprocess.run([ray_bin, "job", "submit", "--no-wait", "--address", ray_head.dashboard_url,
                           "--submission-id", job_id, "--", *entry], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}"
    status = wait_for(lambda: (s := ray_head.job_status(job_id)) in TERMINAL and s, 900, f"Ray job {job_id} to end",
                      interval=1.0)
    logs = ray_head.job_logs(job_id)
    assert status == "SUCCEEDED", f"{status}\n{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}\n{logs[-3000:]}"
    summary = json.loads([ln for ln in logs.splitlines() if ln.startswith("{")][-1])
    assert summary["status"] == "finished" and summary["steps_done"] == 2
    assert (tmp_path / "jobsubmit" / "step_2" / "COMPLETE").exists()
