"""The driver's loop against a scripted board and rollout worker (small Ray actors, no models): a learner
restart seen first through a rollout that lost its weights must not be undone by an outcome poll that was
answered before the restart (a CI run lost steps 0-1 that way: the stale poll rewound to the dead generation).

The fake learner lives in the board: an offer of step s by generation g is answered at once with an outcome
whose weights belong to g. After step 1, generation 1 "dies": rollouts asked to use its weights fail as
`ObjectLostError` (what Ray raises when the weights' owner is gone), and generation 2 says hello 1.5 s later,
resuming at step 2, so that the poll the driver sent right after step 1 (it times out after 1 s) still carries
generation 1's hello.
"""

from __future__ import annotations

import threading
import time

import pytest

from tests.tiny_runs import tiny_cfg

pytestmark = pytest.mark.integration


def _weights(generation: int, version: int):
    from services.runtime.payloads import WeightsHandle

    return WeightsHandle(backend="fake", policy_version=version, generation=generation, refs=(), nbytes=0,
                         n_tensors=0, publish_seconds=0.0)


def _actors():
    import asyncio
    import sys

    import ray
    from ray import cloudpickle

    # This test module is not importable in Ray's workers: ship its actors (and _weights) by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])

    from services.runtime.payloads import LearnerHello, RolloutStats, StepOutcome

    @ray.remote(num_cpus=0)
    class ScriptedBoard:
        def __init__(self):
            self.hello = LearnerHello(generation=1, start_step=0, policy_version=0, weights=_weights(1, 0), pids=(1,),
                                      resumed_from=None)
            self.outcomes: list = []
            self.dead: set[int] = set()

        def is_dead(self, generation: int) -> bool:
            return generation in self.dead

        async def _restart(self):
            await asyncio.sleep(1.5)
            self.hello = LearnerHello(generation=2, start_step=2, policy_version=2, weights=_weights(2, 2),
                                      pids=(2,), resumed_from="step_2")

        async def offer(self, work):
            g = self.hello.generation
            if g in self.dead:
                return
            version = work.step + 1
            self.outcomes.append(StepOutcome(
                step=work.step, generation=g, loss=float(work.step), reward_mean=0.0, grad_norm=1.0, residual=0.0,
                skipped=False, skip_reason="", policy_version=version, staleness=0, samples=1, phase_seconds={},
                weights=_weights(g, version), checkpoint=None))
            if g == 1 and work.step == 1:
                self.dead.add(1)
                asyncio.get_running_loop().create_task(self._restart())

        async def wait_hello(self, after: int, timeout_s: float = 5.0):
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                if self.hello.generation > after:
                    return self.hello
                await asyncio.sleep(0.02)
            return None

        async def wait_outcomes(self, since: int, timeout_s: float = 1.0):
            deadline = time.monotonic() + timeout_s
            while len(self.outcomes) <= since and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            return self.outcomes[since:], self.hello

        def stop(self):
            return None

    @ray.remote(num_cpus=0)
    class ScriptedRollout:
        def __init__(self, board):
            self.board = board

        @ray.method(num_returns=2)
        def rollout(self, req, offset: int = 0, cuts=None):
            if ray.get(self.board.is_dead.remote(req.weights.generation)):
                raise ray.exceptions.ObjectLostError("00" * 28, "", "")
            return b"cache", RolloutStats(step=req.step, worker=0, pid=0, policy_version=req.weights.policy_version,
                                          samples=len(req.prompts), piece_nbytes=(5,), rollout_seconds=0.01,
                                          sync_seconds=0.0)

    return ScriptedBoard, ScriptedRollout


def test_a_poll_answered_before_the_restart_does_not_rewind_the_run(ray_client, tmp_path):
    import ray

    from services.runtime.driver import Driver

    board_cls, rollout_cls = _actors()
    cfg = tiny_cfg(tmp_path, "order", train={"steps": 4}, runtime={"rollout_workers": 1})
    drv = Driver(cfg, hello_timeout_s=30)
    drv.board = board_cls.remote()
    drv.workers = [rollout_cls.remote(drv.board)]
    drv.score_app = None  # no evaluation app (run() would deploy one)
    finished = threading.Event()
    alive = threading.Thread(target=finished.wait, daemon=True)  # stands in for the learner group
    alive.start()
    try:
        drv._loop(alive, time.perf_counter())
    finally:
        finished.set()
        for a in (*drv.workers, drv.board):
            ray.kill(a, no_restart=True)
    s = drv.summary
    assert s.status == "finished"
    # Steps 0-1 were learned by generation 1 and kept; 2-3 by generation 2, which resumed at step 2.
    assert {k: o.generation for k, o in drv.outcomes.items()} == {0: 1, 1: 1, 2: 2, 3: 2}
    assert sorted(s.losses) == [0, 1, 2, 3] and s.learner_generations == 2
    restarts = [line for line in (drv.run_dir / "events.jsonl").read_text().splitlines() if "learner_restart" in line]
    assert len(restarts) == 1, restarts
