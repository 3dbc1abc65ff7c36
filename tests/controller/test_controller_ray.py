"""End to end on the session's local Ray head and a real Redis: the controller as its own uvicorn process
submits real Ray jobs (the stand-in training script, see standin_train.py) and follows them."""

from __future__ import annotations

import json

import pytest

from controller_helpers import TOKEN, ControllerProcess, controller_env
from tests.waiting import wait_for
from services.controller import cli

pytestmark = pytest.mark.integration


def _state(client, job_id):
    return client.get(f"/v1/jobs/{job_id}").json()


def test_job_runs_to_success_across_a_controller_restart(ray_head, redis_server, tmp_path):
    log = tmp_path / "controller.log"
    ctl = ControllerProcess(controller_env(redis_server.url, ray_head.dashboard_url, tmp_path), log).start()
    try:
        with ctl.client() as c:
            assert c.get("/readyz").json() == {"status": "ok", "checks": {"redis": "ok", "ray": "ok"}}
            r = c.post("/v1/jobs", json={"name": "e2e", "config": {"train": {"steps": 10}}})
            assert r.status_code == 201, r.text
            job = r.json()["id"]
            wait_for(lambda: _state(c, job)["state"] == "running", 300, "the job to run")
            wait_for(lambda: _state(c, job)["latest_checkpoint"], 300, "a first checkpoint")

        ctl.stop(crash=True)  # killed mid-job: the Ray job keeps going without its controller

        # A replacement that cannot reach Ray (wrong address) takes over once the dead one's lease expires:
        # it reports Ray unreachable on /readyz and in the job's reason, and leaves the state alone.
        blind = ControllerProcess(controller_env(redis_server.url, "http://127.0.0.1:9", tmp_path),
                                  tmp_path / "blind.log").start()
        try:
            with blind.client() as c:
                j = wait_for(lambda: (x := _state(c, job))["reason"].startswith("Ray unreachable") and x, 180,
                             "the job's reason to report Ray unreachable")
                assert j["state"] == "running" and "last: RUNNING" in j["reason"]
                ready = c.get("/readyz")
                assert ready.status_code == 503
                assert ready.json()["checks"]["ray"].startswith("Ray job server unreachable")
        finally:
            blind.stop()  # graceful: releases the lease at once

        ctl.start()
        with ctl.client() as c:
            done = wait_for(lambda: (j := _state(c, job))["state"] in ("succeeded", "failed") and j, 600,
                            "the job to finish")
            assert done["state"] == "succeeded", done
            states = [t["state"] for t in done["history"]]
            assert states[:2] == ["pending", "submitted"] and states[-1] == "succeeded" and "running" in states
            assert done["attempts"] == 1 and done["latest_checkpoint"]["step"] == 10
            m = c.get(f"/v1/jobs/{job}/metrics").json()
            assert m["latest"]["step"] == 10 and [p["step"] for p in m["history"]] == list(range(1, 11))
            logs = c.get(f"/v1/jobs/{job}/logs").json()
            assert "standin: finished" in logs["text"] and logs["offset"] > 0
            blob = c.get(f"/v1/jobs/{job}/lora/download").content  # a safetensors file: u64 header length, JSON
            n = int.from_bytes(blob[:8], "little")
            assert json.loads(blob[8:8 + n])["__metadata__"]["step"] == "10"
            metrics = c.get("/metrics").text
            assert 'flowbp_controller_jobs{state="succeeded"} 1.0' in metrics
            assert "flowbp_controller_ray_up 1.0" in metrics
    finally:
        ctl.stop()
    text = log.read_text()
    assert "controller up" in text and TOKEN not in text and TOKEN[:12] not in text


def test_died_job_is_resubmitted_and_resumes_cli_follows_it(ray_head, redis_server, tmp_path, capsys,
                                                            monkeypatch):
    ctl = ControllerProcess(controller_env(redis_server.url, ray_head.dashboard_url, tmp_path),
                            tmp_path / "controller.log").start()
    try:
        run_dir = tmp_path / "runs" / "resume-me"
        run_dir.mkdir(parents=True)
        (run_dir / "DIE_ONCE").write_text("")  # the stand-in exits 3 after step 2 of its first attempt
        cfg = tmp_path / "run.yaml"
        cfg.write_text("run_id: resume-me\ntrain:\n  steps: 2\n")
        monkeypatch.setenv("FLOWBP_URL", ctl.url)
        monkeypatch.setenv("FLOWBP_TOKEN", TOKEN)
        assert cli.main(["submit", str(cfg), "--set", "train.steps=4", "--max-resubmits", "1",
                         "--label", "suite=ctl"]) == 0
        job = capsys.readouterr().out.split()[0]
        assert job.startswith("job-")
        assert cli.main(["logs", job, "--follow", "--interval", "0.5"]) == 0  # returns when the job succeeds
        followed = capsys.readouterr().out
        assert "dying on purpose" in followed and "resumed from step_2" in followed
        assert "job succeeded" in followed

        with ctl.client() as c:
            j = _state(c, job)
            first = c.get(f"/v1/jobs/{job}/logs", params={"submission": f"flowbp-{job}-1", "offset": 0}).json()
            unknown = c.get(f"/v1/jobs/{job}/logs", params={"submission": f"flowbp-{job}-3"})
        assert first["ray_submission_id"] == f"flowbp-{job}-1" and "dying on purpose" in first["text"]
        assert unknown.status_code == 404 and "submission=" in unknown.json()["detail"], unknown.text
        assert j["state"] == "succeeded" and j["attempts"] == 2 and j["ray_submission_id"].endswith("-2")
        resub = [t["reason"] for t in j["history"] if "resubmitted" in t["reason"]]
        assert len(resub) == 1 and "failed" in resub[0] and "resume from step_2" in resub[0]
        steps = [int(line.split('"step": ')[1].split(",")[0]) for line in
                 (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert steps == [1, 2, 3, 4]  # resumed, not restarted: every step once

        assert cli.main(["jobs", "--label", "suite=ctl"]) == 0
        table = capsys.readouterr().out
        assert table.splitlines()[0].split()[:3] == ["ID", "NAME", "STATE"] and job in table and "step_4" in table
        assert cli.main(["status", job]) == 0
        status = capsys.readouterr().out
        assert "succeeded" in status and "resubmitted" in status and TOKEN not in status
    finally:
        ctl.stop()


def test_cancel_stops_the_ray_job(ray_head, redis_server, tmp_path, capsys):
    ctl = ControllerProcess(controller_env(redis_server.url, ray_head.dashboard_url, tmp_path),
                            tmp_path / "controller.log").start()
    try:
        with ctl.client() as c:
            job = c.post("/v1/jobs", json={"name": "long", "config": {"train": {"steps": 500}}}).json()["id"]
            wait_for(lambda: _state(c, job)["state"] == "running", 300, "the job to run")
            assert cli.main(["--url", ctl.url, "--token", TOKEN, "cancel", job]) == 0
            assert "cancelled" in capsys.readouterr().out
            j = _state(c, job)
            assert j["state"] == "cancelled" and j["cancel_requested"]
            wait_for(lambda: ray_head.job_status(j["ray_submission_id"]) == "STOPPED", 180, "Ray to stop it")
            assert c.post(f"/v1/jobs/{job}/cancel").status_code == 409
            assert _state(c, job)["state"] == "cancelled"  # the reconciler never resurrects it
    finally:
        ctl.stop()


def test_cli_reports_errors_readably(redis_server, tmp_path, capsys):
    ctl = ControllerProcess(controller_env(redis_server.url, "http://127.0.0.1:9", tmp_path),
                            tmp_path / "controller.log").start()
    try:
        cfg = tmp_path / "bad.yaml"
        cfg.write_text("train:\n  steps: 0\n")
        base = ["--url", ctl.url, "--token", TOKEN]
        assert cli.main(base + ["submit", str(cfg), "--set", "backbone.dtype=int8"]) == 1
        err = capsys.readouterr().err
        assert "config.train.steps" in err and "config.backbone.dtype" in err
        assert cli.main(["--url", ctl.url, "--token", "wrong-token-000000000000", "jobs"]) == 1
        assert "401" in capsys.readouterr().err
        assert cli.main(base + ["status", "job-nope"]) == 1
        assert "no job with id 'job-nope'" in capsys.readouterr().err
        assert cli.main(["--url", "http://127.0.0.1:9", "--token", TOKEN, "jobs"]) == 1
        assert "cannot reach the controller" in capsys.readouterr().err
    finally:
        ctl.stop()
