"""A FlowBP run on a local multi-node Ray cluster, with the rollout node killed mid-run.

`python -m tests.runtime.multinode_scenario OUT_DIR` starts `ray.cluster_utils.Cluster` on loopback: a head (the
driver and the StepBoard; no role resource), a rollout node (`flowbp_rollout`) and a learner node
(`flowbp_learner`, `flowbp_reward`), as the Helm chart's worker groups are. It runs the tiny model with
`runtime.role_resources` on, records on which node each role's actors run, kills the rollout node after step 1,
waits until the cluster reports it dead, adds a new rollout node (what the autoscaler does), lets the run finish,
runs the same config uninterrupted in one process (`flowbp_core.run.train_loop`), and writes OUT_DIR/result.json.

It runs in a process of its own because a process joins one Ray cluster, and pytest's joins the session's.
tests/runtime/test_multinode.py runs it and checks the result.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

for _k, _v in {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_k, _v)

STEPS = 5
KILL_AFTER_STEP = 1
STORE = 150 * 2**20
ROLLOUT_NODE = {"num_cpus": 2, "resources": {"flowbp_rollout": 1}, "object_store_memory": STORE}
LEARNER_NODE = {"num_cpus": 2, "resources": {"flowbp_learner": 1, "flowbp_reward": 1}, "object_store_memory": STORE}


def wait_for(pred, timeout: float, what: str):
    """pred()'s first truthy value, polled until `timeout` seconds have passed (then fail naming `what`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.1)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def actor_nodes(class_names: tuple[str, ...], alive: bool = True) -> dict[str, list[str]]:
    """Node ids of the actors of each class (the live ones, or where every one last ran) from the GCS's table."""
    from ray._private.state import actors

    out: dict[str, list[str]] = {c: [] for c in class_names}
    for a in actors().values():
        for c in class_names:
            if a["ActorClassName"].startswith(c) and (a["State"] == "ALIVE" or not alive):
                out[c].append(a["Address"]["NodeID"])
    return out


def node_alive(node_id: str) -> bool:
    import ray

    return any(n["NodeID"] == node_id and n["Alive"] for n in ray.nodes())


def config(run_dir: Path):
    from tests.tiny_runs import tiny_cfg

    return tiny_cfg(run_dir, "multinode", train={"steps": STEPS},
                    runtime={"rollout_workers": 2, "learners": 1, "rollout_num_cpus": 0.25,
                             "learner_num_cpus": 0.5, "role_resources": True, "hello_timeout_s": 300},
                    eval={"every": 0, "limit": 0, "prompts": {"prompts": ["a red cube"]}})


def run(out: Path) -> dict:
    import ray
    from ray.cluster_utils import Cluster

    from flowbp_core.run import train_loop
    from services.runtime.driver import Driver

    classes = ("RolloutWorker", "RayTrainWorker", "ServeReplica", "StepBoard")
    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": 1, "object_store_memory": STORE, "include_dashboard": False})
    result: dict = {}
    try:
        rollout_node = cluster.add_node(**ROLLOUT_NODE)
        learner_node = cluster.add_node(**LEARNER_NODE)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        result["nodes"] = {"head": cluster.head_node.node_id, "rollout": rollout_node.node_id,
                           "learner": learner_node.node_id}
        result["driver_node"] = ray.get_runtime_context().get_node_id()
        cfg = config(out)
        drv = Driver(cfg)
        box: dict = {}

        def target():
            try:
                box["summary"] = drv.run()
            except BaseException as e:  # noqa: BLE001 - reported in the result
                box["error"] = f"{type(e).__name__}: {e}"

        t = threading.Thread(target=target, daemon=True)
        t.start()
        wait_for(lambda: KILL_AFTER_STEP in drv.outcomes or "error" in box, 600, f"step {KILL_AFTER_STEP}")
        result["before_kill"] = actor_nodes(classes)
        cluster.remove_node(rollout_node, allow_graceful=False)
        wait_for(lambda: not node_alive(rollout_node.node_id), 120, "the killed node reported dead")
        result["killed_at_steps"] = sorted(drv.outcomes)
        spare = cluster.add_node(**ROLLOUT_NODE)
        result["nodes"]["spare"] = spare.node_id
        t.join(timeout=900)
        if t.is_alive():
            raise TimeoutError("the run did not finish within 900 s of the node's death")
        result["after_kill"] = actor_nodes(("RolloutWorker",), alive=False)  # the run has stopped them
        result["error"] = box.get("error")
        s = box.get("summary")
        if s is not None:
            result["summary"] = {"status": s.status, "losses": s.losses, "learner_generations": s.learner_generations,
                                 "rollout_retries": s.rollout_retries}
        events = [json.loads(x) for x in (drv.run_dir / "events.jsonl").read_text().splitlines()]
        result["events"] = [e for e in events if e["event"] != "queue"]
        ref = train_loop(cfg.model_copy(update={"run_id": "ref"}), run_dir=out / "ref")
        result["reference_losses"] = [r.loss for r in ref.results]
    finally:
        ray.shutdown()
        cluster.shutdown()
    return result


def main(argv: list[str]) -> int:
    out = Path(argv[0]).absolute()
    out.mkdir(parents=True, exist_ok=True)
    result = run(out)
    (out / "result.json").write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
