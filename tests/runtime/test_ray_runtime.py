"""The runtime on a real local Ray (the session's `ray_head`): end to end, faults, poisoned steps, resume.

Every run uses the tiny random SD3 and a weight-free reward; the whole module takes a few minutes on 2 cores,
most of it actor start-up, so runs are shared between assertions where one run can answer several questions.
"""

from __future__ import annotations

import math
import os
import signal
import threading

import pytest

from flowbp_core.stages import STAGES

from tests.tiny_runs import run_events, tiny_cfg
from tests.waiting import wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def baseline(ray_client, tmp_path_factory):
    """An uninterrupted run: 2 rollout workers, 1 learner, served reward (decoded on the reward side), 4 steps."""
    from services.runtime.driver import Driver

    d = tmp_path_factory.mktemp("baseline")
    cfg = tiny_cfg(d, "base", train={"steps": 4})
    drv = Driver(cfg)
    summary = drv.run()
    return cfg, drv, summary


def test_end_to_end_served_two_workers(baseline):
    cfg, drv, s = baseline
    assert s.status == "finished", s.failure
    assert sorted(s.losses) == [0, 1, 2, 3]
    assert all(math.isfinite(v) for v in s.losses.values())
    assert s.policy_version == 4 and s.skipped == {}
    # One complete checkpoint per step (checkpoint.every=1), and the eval at the end on the score-only app.
    assert [os.path.basename(p) for p in s.checkpoints] == ["step_1", "step_2", "step_3", "step_4"]
    assert all(os.path.exists(os.path.join(p, "COMPLETE")) for p in s.checkpoints)
    assert 4 in s.eval_scores and math.isfinite(s.eval_scores[4]["reward_mean"])
    steps = [e["step"] for e in run_events(drv.run_dir) if e["event"] == "step"]
    assert steps == [0, 1, 2, 3]
    for phase in STAGES:  # every stage of the step, named once in flowbp_core.stages
        assert s.phase_seconds.get(phase, 0) > 0, phase


def test_runtime_matches_single_process_loop(baseline, tmp_path):
    """Sharded rollouts + served reward give the same losses as flowbp_core.run.train_loop (colocated)."""
    from flowbp_core.run import train_loop

    cfg, _, s = baseline
    ref_cfg = cfg.model_copy(update={"run_id": "ref"})
    out = train_loop(ref_cfg, run_dir=tmp_path / "ref")
    ref = [r.loss for r in out.results]
    assert ref == pytest.approx([s.losses[i] for i in range(4)], rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_learner_ranks_match_one(baseline, tmp_path, strategy):
    """2 learner ranks (gloo; gradient all-reduce, or FSDP-sharded transformer) + 1 rollout worker + colocated
    reward reproduce the baseline (1 rank, 2 rollout workers, served reward): the batch split, the sharding and
    the placement do not change the update."""
    from services.runtime.driver import Driver

    _, _, base = baseline
    cfg = tiny_cfg(tmp_path, strategy, train={"steps": 4},
                   reward={"terms": [{"name": "saturation"}], "loss": "neg_mean", "placement": "colocated"},
                   runtime={"rollout_workers": 1, "learners": 2, "rollout_num_cpus": 0.25, "learner_num_cpus": 0.5,
                            "strategy": strategy})
    drv = Driver(cfg)
    s = drv.run()
    assert s.status == "finished", s.failure
    assert [s.losses[i] for i in range(4)] == pytest.approx([base.losses[i] for i in range(4)], rel=1e-5, abs=1e-7)
    # Each rank fetched its own piece of the step alone: the bytes it read (measured by the rank) are the bytes
    # the rollout wrote for its rows, half the step's each, not the whole step.
    events = run_events(drv.run_dir)
    offered = {e["step"]: e["rank_bytes"] for e in events if e["event"] == "offer"}
    fetched = {e["step"]: e["fetched_bytes"] for e in events if e["event"] == "step"}
    assert sorted(fetched) == [0, 1, 2, 3] and all(len(v) == 2 and min(v) > 0 for v in fetched.values()), fetched
    assert fetched == {k: offered[k] for k in fetched}, (fetched, offered)


def test_rollout_and_learner_killed_run_resumes_exactly(baseline, tmp_path):
    """Kill a rollout worker during the run (Ray restarts it, the call is retried) and then SIGKILL the learner
    after step 1 (Ray Train restarts the group from the newest complete checkpoint): the run finishes, every
    step is counted once per learner generation, and the losses equal the uninterrupted run's."""
    import ray

    from services.runtime.driver import Driver

    _, _, base = baseline
    cfg = tiny_cfg(tmp_path, "faults", train={"steps": 4})
    drv = Driver(cfg)
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("summary", drv.run()), daemon=True)
    t.start()
    wait_for(lambda: 0 in drv.outcomes, 900, "step 0")
    ray.kill(drv.workers[0], no_restart=False)
    wait_for(lambda: 1 in drv.outcomes, 900, "step 1", interval=0.02)
    learner_pid = drv.hello.pids[0]
    os.kill(learner_pid, signal.SIGKILL)
    t.join(timeout=900)
    assert not t.is_alive(), "run did not finish"
    s = box["summary"]
    timeline = [{k: e.get(k) for k in ("event", "step", "generation", "start_step", "resumed_from") if k in e}
                 for e in run_events(drv.run_dir) if e["event"] != "queue"]
    assert s.status == "finished", (s.failure, timeline)
    assert s.learner_generations == 2, timeline
    assert s.rollout_retries >= 1
    assert sorted(s.losses) == [0, 1, 2, 3], timeline
    assert [s.losses[i] for i in range(4)] == pytest.approx([base.losses[i] for i in range(4)], rel=1e-6, abs=1e-8)
    # The learner may finish step 2 before the kill lands (a loaded machine): it resumes from the newest
    # complete checkpoint then, step_2 or step_3, and learns each later step once.
    restart = [e for e in run_events(drv.run_dir) if e["event"] == "learner_restart"]
    assert len(restart) == 1 and restart[0]["resumed_from"].rsplit("_", 1)[0].endswith("step"), restart
    resumed = int(restart[0]["resumed_from"].rsplit("_", 1)[1])
    assert resumed in (2, 3), restart
    by_gen: dict[int, list[int]] = {}
    for e in run_events(drv.run_dir):
        if e["event"] == "step":
            by_gen.setdefault(e["generation"], []).append(e["step"])
    assert by_gen[1][:resumed] == list(range(resumed)) and len(set(by_gen[1])) == len(by_gen[1]), by_gen
    assert by_gen[2] == list(range(resumed, 4)), by_gen


def test_non_finite_steps_are_skipped_counted_and_fail_the_run(ray_client, tmp_path):
    """A LoRA scale of 1e30 makes every gradient infinite: each step is skipped (no update, no checkpoint),
    logged with its reason, and max_bad_steps in a row fail the run with that reason."""
    from services.runtime.driver import Driver, RunFailed

    cfg = tiny_cfg(tmp_path, "poison", backbone={"lora": {"rank": 4, "alpha": 1e30}},
                   reward={"terms": [{"name": "saturation"}], "loss": "neg_mean", "placement": "colocated"},
                   runtime={"rollout_workers": 1, "learners": 1, "rollout_num_cpus": 0.25, "learner_num_cpus": 0.5},
                   train={"steps": 3, "max_bad_steps": 3}, eval={"every": 0, "limit": 1,
                                                                 "prompts": {"prompts": ["x"]}})
    drv = Driver(cfg)
    with pytest.raises(RunFailed, match="non_finite_gradient"):
        drv.run()
    s = drv.summary
    assert s.status == "failed" and "3 steps in a row" in s.failure
    # the streak's last step counts under its own reason, so a NaN-streak alert sees all max_bad_steps
    assert s.skipped == {0: "non_finite_gradient", 1: "non_finite_gradient", 2: "non_finite_gradient"}
    assert s.checkpoints == [] and not list(drv.run_dir.glob("step_*"))
    ev = run_events(drv.run_dir)
    assert [e["skip_reason"] for e in ev if e["event"] == "step"] == ["non_finite_gradient"] * 3
    assert any(e["event"] == "failed" and "non_finite" in e["reason"] for e in ev)


def test_cancel_stops_at_a_step_boundary_without_half_checkpoints(ray_client, tmp_path):
    from services.runtime.driver import Driver

    cancel = threading.Event()
    cfg = tiny_cfg(tmp_path, "cancel", train={"steps": 50},
                   reward={"terms": [{"name": "saturation"}], "loss": "neg_mean", "placement": "colocated"},
                   runtime={"rollout_workers": 1, "learners": 1, "rollout_num_cpus": 0.25, "learner_num_cpus": 0.5})
    drv = Driver(cfg, cancel_event=cancel)
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("summary", drv.run()), daemon=True)
    t.start()
    wait_for(lambda: 1 in drv.outcomes, 900, "step 1")
    cancel.set()
    t.join(timeout=600)
    assert not t.is_alive(), "cancel did not end the run"
    s = box["summary"]
    assert s.status == "cancelled" and 2 <= s.steps_done < 50
    dirs = sorted(p.name for p in drv.run_dir.glob("step_*"))
    assert dirs and not [d for d in dirs if ".tmp-" in d]
    assert all((drv.run_dir / d / "COMPLETE").exists() for d in dirs)
    assert any(e["event"] == "cancelled" for e in run_events(drv.run_dir))
