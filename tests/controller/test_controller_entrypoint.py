"""The real thing: the controller submits `python -m services.entrypoints.train` with the embedded run config
(deploy/configs/embedded.yaml: the project's own small flow model and attribute reward, served reward, rollout
workers and a learner on Ray), shrunk to a few steps, to the session's local Ray head and follows it over REST
to success: state, checkpoints, metrics and the trained LoRA."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest
import yaml

from controller_helpers import REPO, ControllerProcess, controller_env
from tests.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


# The same dotted overrides `flowbp submit --set` takes: a CI-sized run of the embedded model.
SHRINK = ["train.steps=2", "train.batch_size=2", "sampling.n_steps=4", "method.k=2", "runtime.rollout_workers=1",
          "runtime.mode=sync", "runtime.max_staleness=0", "checkpoint.every=1", "eval.every=0", "eval.limit=2"]


def test_embedded_run_over_rest_to_success(ray_head, redis_server, tmp_path):
    from flowbp_core.config import apply_overrides

    config = apply_overrides(yaml.safe_load((REPO / "deploy" / "configs" / "embedded.yaml").read_text()), SHRINK)
    config.pop("run_id", None)  # the controller names the run after the job
    env = controller_env(redis_server.url, ray_head.dashboard_url, tmp_path,
                         FLOWBP_ENTRYPOINT=f"{shlex.quote(sys.executable)} -m services.entrypoints.train",
                         FLOWBP_CHECK_REGISTRIES="true", FLOWBP_RECONCILE_INTERVAL_S="1.0",
                         FLOWBP_RUNTIME_ENV='{"env_vars": {"PYTHONPATH": "%s"}}' % REPO)
    ctl = ControllerProcess(env, tmp_path / "controller.log").start()
    try:
        with ctl.client() as c:
            r = c.post("/v1/jobs", json={"name": "embedded", "config": config, "max_resubmits": 0})
            assert r.status_code == 201, r.text
            job = r.json()["id"]
            done = wait_for(lambda: (j := c.get(f"/v1/jobs/{job}").json())["state"] in
                            ("succeeded", "failed", "cancelled") and j, 1500, "the embedded run to finish", interval=2)
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
