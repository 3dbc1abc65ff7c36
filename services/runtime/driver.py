"""The driver: one loop that keeps a bounded queue of in-flight rollout ObjectRefs, feeds the learner group
through the StepBoard, carries weights from the learner to the rollout workers, and runs eval and shutdown.

Schedules (config `runtime.mode`):
- `sync`: rollout of step t+1 starts after learner step t, with its weights (the reference's schedule).
- `async` with `max_staleness` S: rollout of step s may start while the learner is at step s - S or later, so
  rollout and learning overlap; a cache's staleness (learner version minus sampling version) is logged.
`runtime.queue_depth` bounds the rollout steps in flight (back-pressure on the object store) in both modes.

Each step's prompts are sharded over the rollout workers (contiguous slices; noise is seeded per sample, so the
shards join into exactly the batch one worker would have produced). A worker returns its shard cut at the learner
ranks' bounds (`rank_pieces`), one object a piece, and the offer names each rank's pieces, so a rank fetches its
own rows and nothing else. Only ObjectRefs pass through the driver.

Placement: the StepBoard runs on the driver's node; the learner group starts first and the rollout workers once
its ranks hold their resources; with `runtime.role_resources` each role asks for its worker group's resource.

Failure handling: a rollout worker that dies is restarted by Ray and its call retried (same request, same cache);
one that is gone for good (restarts used up) has its shard sent to a live worker, which samples the same cache
(noise and plan depend on seed, step and offset only), and gets no more shards. A learner group that loses a
worker is restarted by Ray Train from the newest complete checkpoint and says hello with a new generation: the
driver cancels the rollouts still queued for the dead generation, drops what was in flight and rewinds to the
step it resumed at. Cancel (`cancel_event`) stops new rollouts and tells the learner to stop at its next step
boundary: the step in progress finishes (its checkpoint, if due, is written atomically) or is abandoned; nothing
half-written survives.

What the run checks and deploys before the loop is `run_setup`; what it records (outcomes, summary, telemetry) is
`run_record`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import ray

from flowbp_core.config import RunConfig
from flowbp_core.run import build_method, load_prompts, new_run_id
from flowbp_core.step import step_plan
from flowbp_core.training import PromptSampler
from services.runtime import learner as learner_mod
from services.runtime import rollout as rollout_mod
from services.runtime import weight_sync
from services.runtime.board import start_board
from services.runtime.layout import rank_pieces, shard_bounds
from services.runtime.payloads import LearnerHello, LearnerWork, RolloutRequest, RunSummary, StepOutcome
from services.runtime.run_record import RunRecord
from services.runtime.run_setup import (alive_nodes, check_checkpoint_dir, check_learner_split, deploy_reward_apps,
                                        shutdown_reward_apps)

log = logging.getLogger("flowbp.runtime")


class RunFailed(RuntimeError):
    pass


@dataclass
class _InFlight:
    step: int
    cache_refs: list  # per shard, its pieces' refs (one per learner rank it covers)
    stats_refs: list
    submitted: float
    policy_version: int
    weights: object  # the WeightsHandle every shard samples with (a re-routed shard too)
    shards: list  # [(start, end, worker index)] in batch order, one per ref
    offered: bool = False


class Driver:
    def __init__(self, cfg: RunConfig, run_id: str | None = None, cancel_event: threading.Event | None = None,
                 hello_timeout_s: float | None = None):
        check_learner_split(cfg)
        self.cfg = cfg
        self.run_id = run_id or cfg.run_id or new_run_id()
        self.cancel_event = cancel_event or threading.Event()
        self.hello_timeout_s = cfg.runtime.hello_timeout_s if hello_timeout_s is None else hello_timeout_s
        self.run_dir = Path(cfg.checkpoint.dir).absolute() / self.run_id
        self.record = RunRecord(self.run_id, self.run_dir,
                                weight_sync.backend_name(cfg.runtime.weight_sync, cfg.backbone.finetune))
        self.telemetry = self.record.telemetry
        self.summary: RunSummary = self.record.summary  # read while the run goes (the demo's progress bar, tests)
        self.outcomes: dict[int, StepOutcome] = self.record.outcomes
        self.sampler = PromptSampler(load_prompts(cfg.train.prompts), cfg.train.batch_size, cfg.train.seed)
        self.method = build_method(cfg)  # draws each step's plan once; the rollouts carry it to the learner
        self._fit_error: BaseException | None = None
        self._apps: list[str] = []
        self.workers: list = []
        self.dead_workers: set[int] = set()  # rollout workers gone for good (restarts used up, or killed)
        self.board = None

    @property
    def hello(self) -> LearnerHello | None:
        """The learner generation the loop follows (tests read its pids)."""
        return self.record.hello

    def _fit(self, trainer) -> None:
        try:
            trainer.fit()
        except BaseException as e:  # noqa: BLE001 - reported by the loop
            self._fit_error = e

    # ------------------------------------------------------------------------------------------- run
    def run(self) -> RunSummary:
        t_start = time.perf_counter()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.json").write_text(self.cfg.to_json())
        self.telemetry.event("start", config=self.cfg.to_dict())
        thread = None
        try:
            check_checkpoint_dir(self.cfg, alive_nodes())
            served_app, self.score_app = deploy_reward_apps(self.cfg, self.run_id, self._apps)
            self.board = start_board()
            # The learner ranks resolve no relative path of their own: their working folders differ from ours.
            learner_cfg = self.cfg.model_copy(update={"checkpoint": self.cfg.checkpoint.model_copy(
                update={"dir": str(self.run_dir.parent)})})
            trainer = learner_mod.make_trainer(learner_cfg, self.run_id, self.board, served_app,
                                               str(self.run_dir / "ray_train"))
            thread = threading.Thread(target=self._fit, args=(trainer,), name=f"fit-{self.run_id}", daemon=True)
            thread.start()
            # Learner first: on a node both roles may use, its ranks take their GPUs together before rollout
            # workers take them one by one (a group split over nodes, or one that cannot start at all).
            self._wait_placed(thread)
            self.workers = rollout_mod.spawn(self.cfg, self.cfg.runtime.rollout_workers)
            self.telemetry.event("rollout_spawned", workers=len(self.workers))
            self._loop(thread, t_start)
        except BaseException as e:
            self.record.fail(f"{type(e).__name__}: {e}")
            raise
        finally:
            self._shutdown(thread)
            self.record.finish(time.perf_counter() - t_start)
        if self.summary.status == "failed":
            raise RunFailed(self.summary.failure)
        return self.summary

    def _wait_placed(self, thread: threading.Thread) -> None:
        deadline = time.monotonic() + self.hello_timeout_s
        while not ray.get(self.board.wait_placed.remote(1.0)):
            if not thread.is_alive():
                raise RunFailed(f"learner group ended before it started: {self._fit_error!r}")
            if self.cancel_event.is_set():
                raise RunFailed("cancelled before the learner started")
            if time.monotonic() > deadline:
                raise RunFailed(f"learner group was not placed within runtime.hello_timeout_s="
                                f"{self.hello_timeout_s:.0f}s (no nodes with its resources?)")
        self.telemetry.event("learner_placed")

    def _wait_hello(self, after: int, thread: threading.Thread) -> LearnerHello:
        deadline = time.monotonic() + self.hello_timeout_s
        while time.monotonic() < deadline:
            hello = ray.get(self.board.wait_hello.remote(after, 1.0))
            if hello is not None:
                return hello
            if not thread.is_alive():
                raise RunFailed(f"learner group ended before it started: {self._fit_error!r}")
            if self.cancel_event.is_set():
                raise RunFailed("cancelled before the learner started")
        raise RunFailed(f"learner group did not start within runtime.hello_timeout_s={self.hello_timeout_s:.0f}s")

    def _live_workers(self) -> list[int]:
        live = [i for i in range(len(self.workers)) if i not in self.dead_workers]
        if not live:
            raise RunFailed(f"all {len(self.workers)} rollout workers are gone (each used its "
                            f"runtime.max_actor_restarts={self.cfg.runtime.max_actor_restarts} restarts)")
        return live

    def _send(self, step: int, weights, a: int, b: int, worker: int) -> tuple[list, object]:
        """Rows [a, b) of step `step` on `worker`: (the refs of its pieces, one per learner rank, the stats ref)."""
        prompts = self.sampler.batch(step)
        plan = step_plan(self.method, self.cfg.sampling.n_steps, self.cfg.train.seed, step)
        req = RolloutRequest(step=step, seed=self.cfg.train.seed, prompts=tuple(prompts[a:b]), weights=weights,
                             total_batch=len(prompts), plan=plan)
        cuts = tuple((s, e) for s, e, _ in self._pieces(a, b))
        *pieces, stats = self.workers[worker].rollout.options(num_returns=len(cuts) + 1).remote(req, a, cuts)
        return pieces, stats

    def _pieces(self, a: int, b: int) -> list[tuple[int, int, int]]:
        return rank_pieces(a, b, self.cfg.train.batch_size, self.cfg.runtime.learners)

    def _rank_refs(self, item: _InFlight) -> tuple[tuple, ...]:
        """Per learner rank, the refs of the pieces holding its rows, in batch order."""
        out: list[list] = [[] for _ in range(self.cfg.runtime.learners)]
        for (a, b, _), refs in zip(item.shards, item.cache_refs):
            for (_, _, rank), ref in zip(self._pieces(a, b), refs):
                out[rank].append(ref)
        return tuple(tuple(r) for r in out)

    def _rank_bytes(self, item: _InFlight, stats: list) -> list[int]:
        """Per learner rank, the bytes of its pieces as the rollout workers wrote them."""
        out = [0] * self.cfg.runtime.learners
        for (a, b, _), st in zip(item.shards, stats):
            for (_, _, rank), n in zip(self._pieces(a, b), st.piece_nbytes):
                out[rank] += n
        return out

    def _submit(self, step: int, weights) -> _InFlight:
        live = self._live_workers()
        shards = [(a, b, w) for w, (a, b) in zip(live, shard_bounds(self.cfg.train.batch_size, len(live)))]
        refs = [self._send(step, weights, a, b, w) for a, b, w in shards]
        return _InFlight(step, [c for c, _ in refs], [s for _, s in refs], time.perf_counter(),
                         weights.policy_version, weights, shards)

    def _reroute(self, item: _InFlight, i: int, err: ray.exceptions.RayActorError) -> None:
        """Shard i of `item` failed with its worker: sample it on the next live worker (the same cache)."""
        a, b, w = item.shards[i]
        if isinstance(err, ray.exceptions.ActorDiedError):  # gone for good: Ray retries calls while it restarts
            self.dead_workers.add(w)
        live = self._live_workers()
        to = next((x for x in live if x > w), live[0])
        log.warning("rollout worker %d failed step %d (%s): its shard [%d, %d) goes to worker %d",
                    w, item.step, type(err).__name__, a, b, to)
        self.telemetry.event("rollout_rerouted", step=item.step, worker=w, to=to, start=a, end=b,
                             error=type(err).__name__)
        item.cache_refs[i], item.stats_refs[i] = self._send(item.step, item.weights, a, b, to)
        item.shards[i] = (a, b, to)

    def _rollout_stats(self, item: _InFlight) -> list | None:
        """The stats of every shard of `item`, or None while some shard is still running (a shard whose worker
        died is sent again, so it runs again)."""
        ready, _ = ray.wait(item.stats_refs, num_returns=len(item.stats_refs), timeout=0)
        if len(ready) < len(item.stats_refs):
            return None
        stats, rerouted = [], False
        for i, ref in enumerate(list(item.stats_refs)):
            try:
                stats.append(ray.get(ref))
            except (ray.exceptions.ActorDiedError, ray.exceptions.ActorUnavailableError) as e:
                self._reroute(item, i, e)
                rerouted = True
        return None if rerouted else stats

    def _loop(self, thread: threading.Thread, t_start: float) -> None:
        cfg, rt = self.cfg, self.cfg.runtime
        total = cfg.train.steps
        hello = self._wait_hello(0, thread)
        self.record.rewind(hello)
        weights, generation = hello.weights, hello.generation
        next_submit = next_learn = hello.start_step
        inflight: deque[_InFlight] = deque()
        seen = 0
        outcome_fut = None
        eval_steps = learner_mod.eval_steps(self.cfg)
        t_first = time.perf_counter()
        samples = 0
        while next_learn < total:
            if self.cancel_event.is_set():
                self.summary.status = "cancelled"
                self.telemetry.event("cancelled", step=next_learn)
                return
            # 1. fill the queue within the staleness and depth bounds
            lead = rt.max_staleness if rt.mode == "async" else 0
            while (next_submit < total and len(inflight) < rt.queue_depth and next_submit - next_learn <= lead
                   and not (rt.mode == "sync" and inflight)):
                inflight.append(self._submit(next_submit, weights))
                next_submit += 1
            self.telemetry.queue(len(inflight))
            # 2. offer finished rollouts to the learner, in step order
            weights_lost = False
            for item in inflight:
                if item.offered:
                    continue
                try:
                    stats = self._rollout_stats(item)
                except (ray.exceptions.ObjectLostError, weight_sync.WeightsLost) as e:
                    # The weights this rollout was told to load were published (ray.put, or held by a
                    # WeightServer) by a learner that has died since: they are gone, so the rollout cannot run.
                    # The learner group is being restarted from its newest checkpoint; wait for it and redo the
                    # steps from there.
                    log.warning("rollout of step %d lost its weights (%s): waiting for the learner to restart",
                                item.step, type(e).__name__)
                    self.telemetry.event("rollout_weights_lost", step=item.step, generation=generation)
                    weights_lost = True
                    break
                if stats is None:
                    break
                self.record.rollout(stats)
                self.telemetry.event("offer", step=item.step, generation=generation,
                                     rank_bytes=self._rank_bytes(item, stats))
                ray.get(self.board.offer.remote(LearnerWork(step=item.step, rank_refs=self._rank_refs(item),
                                                            rollout_policy_version=item.policy_version,
                                                            generation=generation)))
                item.offered = True
            if weights_lost:
                # An outcome poll still outstanding was answered with the old generation's hello: drop it (its
                # outcomes, if any, come back from the board on the next poll, which asks from `seen`).
                outcome_fut = None
                current = self._wait_hello(generation, thread)
                self._follow_restart(current, inflight)
                weights, generation = current.weights, current.generation
                next_submit = next_learn = current.start_step
                continue
            # 3. wait for whichever comes first: a learner outcome or the next rollout to finish. The outcome
            # poll stays outstanding across iterations, so a finished rollout is offered at once (no bubble).
            if outcome_fut is None:
                outcome_fut = self.board.wait_outcomes.remote(seen, 1.0)
            head = next((it for it in inflight if not it.offered), None)  # offers go in step order
            if head is not None and time.perf_counter() - head.submitted > self.hello_timeout_s:
                raise RunFailed(f"the rollout of step {head.step} did not finish within runtime.hello_timeout_s="
                                f"{self.hello_timeout_s:.0f}s (its workers are gone and no node took them back)")
            pending = [] if head is None else ray.wait(head.stats_refs, num_returns=len(head.stats_refs),
                                                       timeout=0)[1]
            if head is None or pending:  # else the head just became ready: go offer it now
                ray.wait([outcome_fut] + pending, num_returns=1, timeout=1.0)
            ready, _ = ray.wait([outcome_fut], timeout=0)
            if not ready:
                continue
            new, current = ray.get(outcome_fut)
            outcome_fut = None
            seen += len(new)
            # Only a newer generation rewinds: a poll answered before a restart we already followed still carries
            # the dead generation's hello, and rewinding to it would redo finished steps with weights whose owner
            # is gone.
            if current is not None and current.generation > generation:
                self._follow_restart(current, inflight)
                weights, generation = current.weights, current.generation
                next_submit = next_learn = current.start_step
                continue
            for o in new:
                if o.generation != generation:
                    continue
                if inflight and inflight[0].step == o.step:
                    inflight.popleft()
                next_learn = o.step + 1
                samples += o.samples
                self.record.outcome(o, samples / max(time.perf_counter() - t_first, 1e-9))
                if o.failed:
                    raise RunFailed(o.failed)
                if o.weights is not None:
                    weights = o.weights
                if o.step + 1 in eval_steps and self.score_app:  # on the EMA shadow when EMA is on
                    self._evaluate(o.step + 1, o.eval_weights or weights)
            if not thread.is_alive() and next_learn < total:
                raise RunFailed(f"learner group ended at step {next_learn} of {total}: {self._fit_error!r}")
        self.summary.status = "finished"
        self.summary.samples_per_second = samples / max(time.perf_counter() - t_first, 1e-9)

    def _follow_restart(self, hello: LearnerHello, inflight: deque) -> None:
        """A new learner generation: log it, rewind to the step it resumed at, cancel and drop what was in flight
        (sampled with the dead generation's weights, for steps the new one redoes)."""
        log.warning("learner restarted (generation %d): resuming at step %d", hello.generation, hello.start_step)
        self.telemetry.event("learner_restart", generation=hello.generation, start_step=hello.start_step,
                             resumed_from=hello.resumed_from)
        self.record.rewind(hello)
        for item in inflight:
            for ref in item.stats_refs:  # a queued call never runs; a running one finishes and is dropped
                ray.cancel(ref)
        inflight.clear()

    def _evaluate(self, step: int, weights) -> None:
        """Score the eval prompts sampled with `weights`: the learner's EMA shadow (an eval-only handle) when
        `train.ema_decay` is set, else the live weights. The rollouts after it sample with the live weights."""
        e = self.cfg.eval
        prompts = load_prompts(e.prompts, e.limit)
        refs = []
        live = self._live_workers()
        for w, (a, b) in zip(live, shard_bounds(len(prompts), len(live))):
            req = RolloutRequest(step=step, seed=e.seed, prompts=tuple(prompts[a:b]), weights=weights,
                                 total_batch=len(prompts))
            refs.append(self.workers[w].evaluate.remote(req, self.score_app, a))
        scores = [x for r in ray.get(refs) for x in r]
        self.record.evaluation(step, {"reward_mean": float(sum(scores) / max(len(scores), 1))})

    # --------------------------------------------------------------------------------------- shutdown
    def _shutdown(self, thread: threading.Thread | None) -> None:
        if self.board is not None:
            try:
                ray.get(self.board.stop.remote(), timeout=10)
            except Exception:  # noqa: BLE001 - the board may be gone already
                pass
        if thread is not None:
            thread.join(timeout=120)
            if thread.is_alive():
                log.error("learner group did not stop within 120 s")
        for w in self.workers:
            ray.kill(w, no_restart=True)
        if self.board is not None:
            ray.kill(self.board, no_restart=True)
        shutdown_reward_apps(self._apps)
