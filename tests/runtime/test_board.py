"""The StepBoard with the driver's loop (small Ray actors, no models): published weights are not pinned for the
whole run, and an offer sampled for a dead learner generation never reaches the new one.

A fake learner stands in for the group: it takes each step's offer from the real board and reports an outcome
with freshly published weights (4 MiB each, through the real `lora_delta` backend), as rank 0 does.
"""

from __future__ import annotations

import threading
import time

import pytest

from tests.tiny_runs import tiny_cfg
from tests.waiting import wait_for

pytestmark = pytest.mark.integration

STEPS = 30
WEIGHTS_MIB = 4


def _actors():
    import sys

    import ray
    from ray import cloudpickle

    # This test module is not importable in Ray's workers: ship its actors by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])

    from services.runtime.payloads import LearnerHello, RolloutStats, StepOutcome

    @ray.remote(num_cpus=0)
    class FakeLearner:
        """Rank 0 of a learner group that publishes WEIGHTS_MIB of weights after every step."""

        def __init__(self):
            import torch

            from services.runtime.weight_sync import LoRASync

            self.sync = LoRASync()
            self.state = {"w": torch.zeros(WEIGHTS_MIB * 1024 * 1024 // 4)}

        def run(self, board, steps: int) -> int:
            import os

            from services.runtime.board import STOP

            gen = ray.get(board.next_generation.remote())
            weights = self.sync.publish(self.state, 0, gen)
            ray.get(board.say_hello.remote(LearnerHello(generation=gen, start_step=0, policy_version=0, weights=weights,
                                                        pids=(os.getpid(),), resumed_from=None)))
            for step in range(steps):
                work = None
                while work is None:
                    work = ray.get(board.take.remote(step, gen))
                if work == STOP:
                    return step
                weights = self.sync.publish(self.state, step + 1, gen)
                ray.get(board.report.remote(StepOutcome(
                    step=step, generation=gen, loss=0.0, reward_mean=0.0, grad_norm=1.0, residual=0.0,
                    skipped=False, skip_reason="", policy_version=step + 1, staleness=0, samples=1,
                    phase_seconds={}, weights=weights, checkpoint=None)))
            return steps

    @ray.remote(num_cpus=0)
    class ScriptedRollout:
        @ray.method(num_returns=2)
        def rollout(self, req, offset: int = 0, cuts=None):
            return b"cache", RolloutStats(step=req.step, worker=0, pid=0, policy_version=req.weights.policy_version,
                                          samples=len(req.prompts), piece_nbytes=(5,), rollout_seconds=0.01,
                                          sync_seconds=0.0)

    return FakeLearner, ScriptedRollout


def _store_bytes_used() -> int:
    import ray
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    reply = get_memory_info_reply(get_state_from_address(ray.get_runtime_context().gcs_address))
    return int(reply.store_stats.object_store_bytes_used)


def test_object_store_stays_flat_over_30_weight_publishes(ray_client, tmp_path):
    import ray

    from services.runtime.board import StepBoard
    from services.runtime.driver import Driver

    learner_cls, rollout_cls = _actors()
    cfg = tiny_cfg(tmp_path, "flat", train={"steps": STEPS}, runtime={"rollout_workers": 1})
    drv = Driver(cfg, hello_timeout_s=60)
    drv.board = StepBoard.remote()
    drv.workers = [rollout_cls.remote()]
    drv.score_app = None  # no evaluation app (run() would deploy one)
    learner = learner_cls.remote()
    baseline = _store_bytes_used()
    done = learner.run.remote(drv.board, STEPS)
    finished = threading.Event()
    alive = threading.Thread(target=finished.wait, daemon=True)  # stands in for the learner group's fit
    alive.start()
    try:
        drv._loop(alive, time.perf_counter())
        assert ray.get(done, timeout=300) == STEPS
        # The newest weights and the generation's first ones stay; older versions are freed (asynchronously).
        bound = baseline + 3 * WEIGHTS_MIB * 2**20
        wait_for(lambda: _store_bytes_used() <= bound, 120, f"the object store to free all but 3 weight versions "
                 f"({3 * WEIGHTS_MIB} MiB above its baseline) after {STEPS} publishes", interval=0.5)
    finally:
        finished.set()
        for a in (*drv.workers, drv.board, learner):
            ray.kill(a, no_restart=True)
    assert drv.summary.status == "finished" and sorted(drv.summary.losses) == list(range(STEPS))


def test_an_offer_for_a_dead_generation_is_not_taken_by_the_new_one(ray_client):
    import ray

    from services.runtime.board import StepBoard
    from services.runtime.payloads import LearnerHello, LearnerWork, WeightsHandle

    board = StepBoard.remote()
    try:
        handle = WeightsHandle(backend="fake", policy_version=0, generation=2, refs=(), nbytes=0, n_tensors=0,
                               publish_seconds=0.0)
        assert ray.get(board.next_generation.remote()) == 1
        assert ray.get(board.next_generation.remote()) == 2
        hello = LearnerHello(generation=2, start_step=0, policy_version=0, weights=handle, pids=(1,),
                             resumed_from=None)
        ray.get(board.say_hello.remote(hello))
        # The driver made this offer for generation 1 before it saw generation 2's hello.
        stale = LearnerWork(step=0, rank_refs=(), rollout_policy_version=0, generation=1)
        assert ray.get(board.offer.remote(stale)) is False
        assert ray.get(board.take.remote(0, 2, 0.2)) is None
        fresh = LearnerWork(step=0, rank_refs=(), rollout_policy_version=0, generation=2)
        assert ray.get(board.offer.remote(fresh)) is True
        assert ray.get(board.take.remote(0, 2, 0.2)) == fresh
    finally:
        ray.kill(board, no_restart=True)
