"""Multi-node Ray (issue 17, point 3, first half; issue 18, item 11): on a local cluster of a head, a rollout node
and a learner node (tests/runtime/multinode_scenario.py), each role runs on the node that offers its resource,
the StepBoard on the driver's node; killing the rollout node after step 1 (a new one joins, as the autoscaler
would add it) costs nothing: the run finishes, every step is counted once, and the losses equal an uninterrupted
run's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
LIMIT_S = 1500


@pytest.fixture(scope="module")
def scenario(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("multinode")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    try:
        p = subprocess.run([sys.executable, "-m", "tests.runtime.multinode_scenario", str(out)], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=LIMIT_S)
    except subprocess.TimeoutExpired as e:
        tail = (e.stderr or b"")[-3000:]
        pytest.fail(f"the multi-node scenario did not end within {LIMIT_S}s; its last output:\n{tail}")
    assert p.returncode == 0, f"scenario failed ({p.returncode}):\n{p.stderr[-4000:]}"
    return json.loads((out / "result.json").read_text())


def test_each_role_runs_on_the_node_with_its_resource(scenario):
    nodes, before = scenario["nodes"], scenario["before_kill"]
    assert scenario["driver_node"] == nodes["head"]
    assert before["RolloutWorker"] == [nodes["rollout"]] * 2, (nodes, before)
    assert before["RayTrainWorker"] == [nodes["learner"]], (nodes, before)
    assert before["ServeReplica"] == [nodes["learner"]], (nodes, before)  # flowbp_reward is on the learner node
    assert before["StepBoard"] == [scenario["driver_node"]], (nodes, before)


def test_the_run_survives_the_rollout_node_and_every_step_counts_once(scenario):
    assert scenario["error"] is None, scenario["error"]
    s, nodes = scenario["summary"], scenario["nodes"]
    timeline = [(e["event"], e.get("step")) for e in scenario["events"]]
    assert s["status"] == "finished", timeline
    assert scenario["killed_at_steps"][-1] < 4, "the node was killed after the run's last step"
    assert sorted(int(k) for k in s["losses"]) == list(range(5)), timeline
    assert [e["step"] for e in scenario["events"] if e["event"] == "step"] == list(range(5)), timeline
    assert s["learner_generations"] == 1, timeline  # the learner node was not touched: no restart
    assert s["rollout_retries"] >= 1  # the workers came back (new processes) on the new node
    assert scenario["after_kill"]["RolloutWorker"] == [nodes["spare"]] * 2, scenario["after_kill"]
    losses = [s["losses"][str(i)] for i in range(5)]
    assert losses == pytest.approx(scenario["reference_losses"], rel=1e-5, abs=1e-7)
