"""Head fault tolerance: a Ray head whose GCS keeps its tables in a real Redis (as KubeRay's
`gcsFaultToleranceOptions` set it up: `RAY_REDIS_ADDRESS` on the head), a FlowBP job submitted to it, and the GCS
server killed mid-run and started again. The job must carry on with nothing lost."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from services.localproc import RayHead
from tests.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
STEPS = 5
OUTAGE_S = 3.0  # how long the head runs without a GCS before it is started again
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


@dataclass(frozen=True, kw_only=True)
class GcsLaunch:
    """How the head started its GCS server, read from /proc so that the same server can be started again.

    Attributes:
        argv: the gcs_server command line (port, session, Redis address and system config included).
        env: its environment (RAY_REDIS_ADDRESS, RAY_external_storage_namespace, ...).
        cwd: its working directory.
    """

    argv: list[str]
    env: dict[str, str]
    cwd: str


def _kill_gcs(head: RayHead) -> GcsLaunch:
    pids = head.pids_of("gcs_server")
    assert len(pids) == 1, f"expected one gcs_server under the head, found pids {pids}"
    proc = Path("/proc") / str(pids[0])
    launch = GcsLaunch(argv=[a.decode() for a in (proc / "cmdline").read_bytes().split(b"\0") if a],
                       env=dict(e.decode().split("=", 1) for e in (proc / "environ").read_bytes().split(b"\0")
                                if b"=" in e),
                       cwd=os.readlink(proc / "cwd"))
    os.kill(pids[0], signal.SIGKILL)
    wait_for(lambda: not head.pids_of("gcs_server"), 30, f"gcs_server pid {pids[0]} to exit after SIGKILL")
    return launch


@pytest.fixture
def ft_head(redis_server):
    head = RayHead(num_cpus=2, object_store_mb=200,
                   env={"RAY_REDIS_ADDRESS": f"127.0.0.1:{redis_server.port}",
                        "RAY_external_storage_namespace": "flowbp-gcs-ft",
                        # how long raylets and workers wait for the GCS to come back before they give up
                        "RAY_gcs_rpc_server_reconnect_timeout_s": "300"}).start(timeout=600)
    try:
        yield head
    finally:
        head.stop()


def test_gcs_killed_mid_run_restarts_and_the_job_carries_on(ft_head, redis_server, tmp_path):
    from flowbp_core.config import load_config
    from flowbp_core.run import train_loop

    overrides = [f"checkpoint.dir={tmp_path}", "run_id=gcsft", f"train.steps={STEPS}", "runtime.rollout_workers=1",
                 "checkpoint.keep=10", "eval.limit=1"]
    entry = " ".join([sys.executable, "-m", "services.entrypoints.train",
                      "--config", str(REPO / "deploy/configs/tiny.yaml"), *(f"--{o}" for o in overrides)])
    job_id = ft_head.submit_job(entry, "flowbp-gcs-ft", {"env_vars": {"PYTHONPATH": str(REPO)}})
    run_dir = tmp_path / "gcsft"
    raylets = ft_head.pids_of("raylet")
    wait_for(lambda: (run_dir / "step_1" / "COMPLETE").exists() or ft_head.job_status(job_id) in TERMINAL, 600,
             f"the job's first checkpoint {run_dir}/step_1/COMPLETE")
    assert not (run_dir / f"step_{STEPS}").exists(), "the job finished before the GCS could be killed mid-run"

    launch = _kill_gcs(ft_head)
    time.sleep(OUTAGE_S)  # the outage itself, not a wait for an event
    gcs = subprocess.Popen(launch.argv, env=launch.env, cwd=launch.cwd, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        status = wait_for(lambda: (s := ft_head.job_status(job_id)) in TERMINAL and s, 900,
                          f"Ray job {job_id} to end after the GCS restart", interval=1.0)
        logs = ft_head.job_logs(job_id)
        assert status == "SUCCEEDED", logs[-4000:]
        # The raylet rode out the outage: a GCS without its tables in Redis would not know the node and end it.
        assert ft_head.pids_of("raylet") == raylets
        assert ft_head.pids_of("gcs_server") == [gcs.pid]
    finally:
        ft_head.stop()
        gcs.wait(timeout=30)

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps_done"] == STEPS, summary
    assert sorted(int(k) for k in summary["losses"]) == list(range(STEPS))
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    by_gen: dict[int, list[int]] = {}
    for e in events:
        if e["event"] == "step":
            by_gen.setdefault(e["generation"], []).append(e["step"])
    assert all(len(set(s)) == len(s) for s in by_gen.values()), by_gen  # no step learned twice by one learner
    assert sorted({s for steps in by_gen.values() for s in steps}) == list(range(STEPS)), by_gen
    assert all((run_dir / f"step_{s}" / "COMPLETE").exists() for s in range(1, STEPS + 1))

    ref_cfg = load_config(REPO / "deploy/configs/tiny.yaml", [*overrides, "run_id=ref"])
    ref = [r.loss for r in train_loop(ref_cfg, run_dir=tmp_path / "ref").results]
    assert [summary["losses"][str(i)] for i in range(STEPS)] == pytest.approx(ref, rel=1e-5, abs=1e-7)
