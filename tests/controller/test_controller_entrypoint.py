"""The real thing: the controller submits `python -m services.entrypoints.train` with the tiny run config
(deploy/configs/tiny.yaml: a tiny random SD3, served reward, 2 rollout workers, 1 learner) to the session's
local Ray head and follows it over REST to success."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest
import yaml

from ctl_helpers import REPO, ControllerProcess, controller_env, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_tiny_run_over_rest_to_success(ray_head, redis_server, tmp_path):
    config = yaml.safe_load((REPO / "deploy" / "configs" / "tiny.yaml").read_text())
    config.pop("run_id", None)  # the controller names the run after the job
    env = controller_env(redis_server.url, ray_head.dashboard_url, tmp_path,
                         FLOWBP_ENTRYPOINT=f"{shlex.quote(sys.executable)} -m services.entrypoints.train",
                         FLOWBP_CHECK_REGISTRIES="true", FLOWBP_RECONCILE_INTERVAL_S="1.0",
                         FLOWBP_RUNTIME_ENV='{"env_vars": {"PYTHONPATH": "%s"}}' % REPO)
    ctl = ControllerProcess(env, tmp_path / "controller.log").start()
    try:
        with ctl.client() as c:
            r = c.post("/v1/jobs", json={"name": "tiny", "config": config, "max_resubmits": 0})
            assert r.status_code == 201, r.text
            job = r.json()["id"]
            done = wait_for(lambda: (j := c.get(f"/v1/jobs/{job}").json())["state"] in
                            ("succeeded", "failed", "cancelled") and j, 600, "the tiny run to finish", interval=2)
            logs = c.get(f"/v1/jobs/{job}/logs", params={"tail": 40}).json()["text"]
            assert done["state"] == "succeeded", f"{done['reason']}\n{logs}"
            steps = config["train"]["steps"]
            assert done["latest_checkpoint"]["step"] == steps
            ckpts = c.get(f"/v1/jobs/{job}/checkpoints").json()
            assert ckpts["latest_complete"]["step"] == steps
            assert Path(ckpts["latest_complete"]["path"]).parent == tmp_path / "runs" / job
            m = c.get(f"/v1/jobs/{job}/metrics").json()
            assert len(m["history"]) == steps and "loss" in m["latest"], m  # one row per optimizer step
            link = c.get(f"/v1/jobs/{job}/lora").json()
            assert link["step"] == steps and link["bytes"] > 0, link
            blob = c.get(link["url"]).content
            assert len(blob) == link["bytes"] and json.loads(blob[8:8 + int.from_bytes(blob[:8], "little")])
    finally:
        ctl.stop()
