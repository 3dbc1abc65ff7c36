"""Placement and restarts on the session's local Ray (issue 18, item 11): a rollout worker that is gone for good
has its shard sampled by a live one (the same losses), the learner group is placed before the rollout workers,
rollouts queued for a dead learner generation are cancelled, and the runtime's limits are checked at load.

The multi-node half (each role on its own node, a node killed mid-run) is tests/runtime/test_multinode.py.
"""

from __future__ import annotations

import threading
import time

import pytest

from flowbp_core.config import config_from_dict
from flowbp_core.errors import ConfigError
from tests.tiny_runs import run_events, tiny_cfg

pytestmark = pytest.mark.integration


def _wait(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _colocated(tmp_path, run_id: str, **runtime):
    return tiny_cfg(tmp_path, run_id, train={"steps": 4},
                    reward={"terms": [{"name": "saturation"}], "loss": "neg_mean", "placement": "colocated"},
                    runtime={"rollout_workers": 2, "learners": 1, "rollout_num_cpus": 0.25,
                             "learner_num_cpus": 0.5, **runtime},
                    eval={"every": 0, "limit": 0, "prompts": {"prompts": ["a red cube"]}})


def test_a_dead_rollout_workers_shard_goes_to_a_live_worker(ray_client, tmp_path):
    """Rollout worker 0 is killed for good after step 0: the shard it was sent next is sampled by worker 1, the
    later steps go to worker 1 alone, and the losses equal the single-process loop's (a shard's cache depends on
    seed, step and offset only). The learner group was placed before any rollout worker was started."""
    import ray

    from flowbp_core.run import train_loop
    from services.runtime.driver import Driver

    cfg = _colocated(tmp_path, "reroute")
    drv = Driver(cfg)
    t0_ms = time.time() * 1000
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("summary", drv.run()), daemon=True)
    t.start()
    _wait(lambda: 0 in drv.outcomes, 240, "step 0")
    ray.kill(drv.workers[0], no_restart=True)
    t.join(timeout=300)
    assert not t.is_alive(), "run did not finish"
    s = box["summary"]
    events = run_events(drv.run_dir)
    names = [e["event"] for e in events]
    assert s.status == "finished", (s.failure, names)
    assert drv.dead_workers == {0}
    rerouted = [e for e in events if e["event"] == "rollout_rerouted"]
    assert rerouted and all(e["worker"] == 0 and e["to"] == 1 for e in rerouted), rerouted
    assert [e["step"] for e in events if e["event"] == "step"] == [0, 1, 2, 3]
    ref = train_loop(cfg.model_copy(update={"run_id": "ref"}), run_dir=tmp_path / "ref")
    assert [s.losses[i] for i in range(4)] == pytest.approx([r.loss for r in ref.results], rel=1e-5, abs=1e-7)
    # Ray's own record: every learner rank was started before the first rollout worker.
    started = _start_times(t0_ms)
    assert started["RayTrainWorker"] and len(started["RolloutWorker"]) == 2, started
    assert max(started["RayTrainWorker"]) <= min(started["RolloutWorker"]), started
    assert names.index("learner_placed") < names.index("rollout_spawned")


def _start_times(since_ms: float) -> dict[str, list[int]]:
    """Start times (ms) of the learner ranks and rollout workers created since `since_ms`, from the GCS."""
    from ray._private.state import actors

    out: dict[str, list[int]] = {"RayTrainWorker": [], "RolloutWorker": []}
    for a in actors().values():
        if a["ActorClassName"] in out and a["StartTime"] >= since_ms:
            out[a["ActorClassName"]].append(a["StartTime"])
    return out


def test_rollouts_queued_for_a_dead_generation_are_cancelled(ray_client, tmp_path):
    """Three steps sent to one worker (one runs, two queue behind it); a new learner generation says hello: the
    queued ones are cancelled instead of sampled with weights nobody will train on."""
    from collections import deque

    import ray

    from services.runtime import rollout as rollout_mod
    from services.runtime.driver import Driver
    from services.runtime.payloads import LearnerHello, WeightsHandle

    cfg = _colocated(tmp_path, "cancel", rollout_workers=1)
    drv = Driver(cfg)
    drv.workers = rollout_mod.spawn(cfg, 1)
    try:
        # (generation, version) = (-1, -1) is what a fresh worker holds: it samples with its own weights
        held = WeightsHandle(backend="lora_delta", policy_version=-1, generation=-1, refs=(), nbytes=0,
                             n_tensors=0, publish_seconds=0.0)
        ray.get(drv.workers[0].pid.remote(), timeout=120)
        items = [drv._submit(step, held) for step in range(3)]
        drv._follow_restart(LearnerHello(generation=2, start_step=0, policy_version=0, weights=held, pids=(0,),
                                         resumed_from=None), deque(items))
        outcomes = []
        for item in items:
            try:
                ray.get(item.stats_refs, timeout=120)
                outcomes.append("done")
            except ray.exceptions.TaskCancelledError:
                outcomes.append("cancelled")
        assert outcomes[1:] == ["cancelled", "cancelled"], outcomes
    finally:
        for w in drv.workers:
            ray.kill(w, no_restart=True)


@pytest.mark.parametrize(("field", "value", "allowed"), [
    ("hello_timeout_s", 5, "greater than or equal to 10"),
    ("hello_timeout_s", 1e6, "less than or equal to 86400"),
    ("max_actor_restarts", 101, "less than or equal to 100"),
    ("role_resources", "yes", "a valid boolean"),
    ("rollout_gpus", 1.5, "a fraction in [0, 1] or a whole number up to 8"),
    ("rollout_gpus", -0.5, "greater than or equal to 0"),
    ("learner_gpus", 9, "less than or equal to 8"),
])
def test_runtime_limits_name_the_field(field, value, allowed):
    with pytest.raises(ConfigError) as e:
        config_from_dict({"runtime": {field: value}}, check_registries=False)
    assert f"runtime.{field}" in str(e.value) and allowed in str(e.value), str(e.value)


def test_role_resources_are_off_by_default_and_name_the_chart_groups():
    from services.runtime.placement import ROLES, role_resource, role_resources

    cfg = config_from_dict({}, check_registries=False)
    assert not cfg.runtime.role_resources and all(role_resources(cfg, r) == {} for r in ROLES)
    on = config_from_dict({"runtime": {"role_resources": True}}, check_registries=False)
    assert {r: role_resources(on, r) for r in ROLES} == {
        "rollout": {"flowbp_rollout": 0.001}, "learner": {"flowbp_learner": 0.001},
        "reward": {"flowbp_reward": 0.001}}
    assert [role_resource(r) for r in ROLES] == ["flowbp_rollout", "flowbp_learner", "flowbp_reward"]


def test_each_role_requests_its_gpus_and_one_card_holds_every_role(tmp_path):
    """`runtime.rollout_gpus`, `runtime.learner_gpus` and `reward.served.num_gpus` are what the rollout workers,
    the learner ranks and the reward replicas ask Ray for; fractions that add up to one card put every role on a
    one-GPU machine, a CPU run asks for none, and several NCCL learner ranks cannot share a card."""
    from services.runtime.learner import rank_resources
    from services.runtime.placement import ROLES, role_gpus
    from services.runtime.rollout import actor_options

    one_card = tiny_cfg(tmp_path, "one", runtime={"use_gpu": True, "rollout_gpus": 0.5, "learner_gpus": 0.25,
                                                  "rollout_num_cpus": 0.25, "learner_num_cpus": 0.5},
                        reward={"served": {"num_gpus": 0.25}})
    assert actor_options(one_card)["num_gpus"] == 0.5
    assert rank_resources(one_card) == {"CPU": 0.5, "GPU": 0.25}
    assert role_gpus(one_card, "reward") == 0.25
    assert sum(role_gpus(one_card, r) for r in ROLES) == 1.0
    cpu = tiny_cfg(tmp_path, "cpu", runtime={"rollout_gpus": 0.5})
    assert actor_options(cpu)["num_gpus"] == 0.0 and "GPU" not in rank_resources(cpu)
    whole = tiny_cfg(tmp_path, "whole", runtime={"use_gpu": True, "learners": 2, "rollout_workers": 2})
    assert (actor_options(whole)["num_gpus"], rank_resources(whole)["GPU"]) == (1.0, 1.0)
    with pytest.raises(ConfigError, match=r"runtime.learner_gpus=0.5 is not allowed: expected at least 1 with "
                                          r"runtime.learners=2 on a use_gpu run"):
        config_from_dict({"runtime": {"use_gpu": True, "learners": 2, "learner_gpus": 0.5}}, check_registries=False)
