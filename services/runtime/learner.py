"""The learner group: a Ray Train `TorchTrainer` whose ranks take each step's caches from the StepBoard,
build the method's endpoint, score it, step the optimizer (and EMA), publish weights and write checkpoints.

- Every rank takes the same offer and fetches only its own rows of the batch: the pieces the rollout workers cut
  at its bounds (`LearnerWork.rank_refs[rank]`), read as views into the object store (no copy; several pieces are
  joined into one copy of its rows), so the batch is data-parallel and a rank reads 1/L of the step's caches. The
  bytes each rank fetched are in the step's outcome (`fetched_bytes`).
  The step is `flowbp_core.step.learn_step` with the group's reducer (flowbp_core.reducers): `AllReduceMean`
  averages the gradients in flat buckets (what DDP computes; DDP itself does not allow the methods' several
  re-forwards per step), `FSDPReduce` under FSDP, `NoReduce` for a group of one. Backend: gloo on CPU,
  `cpu:gloo,cuda:nccl` on GPU (Ray Train sets the process group up); the small collectives (skip flag, loss,
  norms, generation) use tensors on the group's device.
- The batch must split evenly over the ranks (the driver refuses it otherwise, `check_learner_split`).
- `runtime.strategy: fsdp` shards the transformer over the ranks instead (`sharding.py`, PyTorch's FSDP2):
  its backward reduce-scatters the mean gradient. Weight publishes gather the full tensors into rank 0's host
  memory alone (one tensor at a time; other ranks keep no copy). A full fine-tune writes `sharded` checkpoints
  (torch distributed checkpoint: every rank its shards, nothing gathered); LoRA writes the `full` file a single
  process writes, from tensors gathered to rank 0. Both resume under either strategy (`flowbp_core.checkpoint`).
- A non-finite reward/loss/gradient on any rank skips the step on every rank (agreed before backward, which is a
  collective under FSDP; a non-finite gradient is agreed after it),
  and `train.max_bad_steps` in a row end the run with that reason. A skipped step writes no checkpoint.
- On (re)start, rank 0 picks the newest complete checkpoint of the run and every rank loads that one (a rank's
  own listing may lag: NFS attribute caches); rank 0 then says hello with a new generation and the weights it
  resumed with. Ray Train's FailureConfig restarts a group that lost a worker.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import ray
import torch

from flowbp_core import checkpoint as ckpt
from flowbp_core.cache import TrajectoryCache
from flowbp_core.config import RunConfig
from flowbp_core.errors import ConfigError
from flowbp_core.reducers import AllReduceMean, FSDPReduce, NoReduce, collective_device
from flowbp_core.stages import SYNC, TRANSFER, timed
from flowbp_core.step import StepResult, learn_step
from flowbp_core.training import EMA, BadStepGuard, NonFiniteStreak
from services.runtime import components, sharding, weight_sync
from services.runtime.board import STOP
from services.runtime.payloads import LearnerHello, StepOutcome
from services.runtime.placement import role_gpus, role_resources


def concat_caches(caches: list[TrajectoryCache]) -> TrajectoryCache:
    """Join pieces of one step along the batch (in the order given: batch order)."""
    if len(caches) == 1:
        return caches[0]
    first = caches[0]
    for c in caches[1:]:
        if not torch.equal(c.sigmas, first.sigmas) or set(c.states) != set(first.states) \
                or set(c.velocities) != set(first.velocities) or set(c.cond) != set(first.cond) \
                or c.plan != first.plan:
            raise ValueError("rollout shards of one step disagree on schedule, plan or kept states/velocities")

    def cat_cond(k: str) -> torch.Tensor:
        ts = [c.cond[k] for c in caches]
        per_sample = all(t.dim() > 0 and t.shape[0] == c.batch_size for t, c in zip(ts, caches))
        # One-sample pieces cannot tell a shared tensor (the negative prompt's) from a per-sample one: equal
        # ones are kept once, which the backbone broadcasts over the batch as it does any shared conditioning.
        if per_sample and all(c.batch_size == 1 for c in caches) and all(torch.equal(t, ts[0]) for t in ts):
            per_sample = False
        return torch.cat(ts) if per_sample else ts[0]

    return TrajectoryCache(
        noise=torch.cat([c.noise for c in caches]),
        states={i: torch.cat([c.states[i] for c in caches]) for i in first.states},
        velocities={i: torch.cat([c.velocities[i] for c in caches]) for i in first.velocities},
        sigmas=first.sigmas,
        final=torch.cat([c.final for c in caches]),
        plan=first.plan,
        seed=first.seed,
        policy_version=min(c.policy_version for c in caches),
        cond={k: cat_cond(k) for k in first.cond},
        prompts=[p for c in caches for p in c.prompts],
        meta={k: v for k, v in first.meta.items() if k not in ("worker", "offset")},
    )


def read_pieces(buffers: list) -> tuple[TrajectoryCache, int]:
    """One cache from the pieces `ray.get` returned (views into the object store; joined when several) and the
    bytes read."""
    caches = [TrajectoryCache.from_buffer(b) for b in buffers]
    return concat_caches(caches), sum(memoryview(b).nbytes for b in buffers)


def fetch_rows(work, rank: int, world: int, batch: int) -> tuple[TrajectoryCache, int]:
    """Rank `rank`'s rows of the step in `work` (fetching its pieces alone) and the bytes it fetched."""
    if len(work.rank_refs) != world:
        raise ValueError(f"LearnerWork.rank_refs has {len(work.rank_refs)} ranks' pieces, the group has {world}")
    cache, nbytes = read_pieces(ray.get(list(work.rank_refs[rank])))
    if cache.batch_size != batch // world:
        raise ValueError(f"rank {rank} got {cache.batch_size} samples of step {work.step}, its share of "
                         f"train.batch_size={batch} over {world} ranks is {batch // world}")
    return cache, nbytes


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 else None


def broadcast_int(dist, value: int, src: int = 0) -> int:
    """Rank `src`'s `value` on every rank."""
    t = torch.tensor([int(value)], dtype=torch.int64, device=collective_device(dist))
    dist.broadcast(t, src=src)
    return int(t.item())


def gather_ints(dist, value: int, world: int) -> tuple[int, ...]:
    """Every rank's `value`, in rank order, on every rank (one all-reduce of a one-hot vector)."""
    if dist is None:
        return (int(value),)
    t = torch.zeros(world, dtype=torch.int64, device=collective_device(dist))
    t[dist.get_rank()] = int(value)
    dist.all_reduce(t)
    return tuple(int(x) for x in t.tolist())


class LearnerRank:
    """One rank's state and step logic (no Ray Train inside, so a test can drive it in-process). The parts and
    the step are the single-process loop's (`run.build_components`, `step.learn_step`, `run.save`).

    Start-up order matters under FSDP: the newest complete checkpoint is loaded into the whole model first (its
    tensors are full), then the transformer is sharded, and only then are the optimizer and EMA built over the
    (sharded) parameters and given their saved state, sharded the same way."""

    def __init__(self, cfg: RunConfig, run_id: str, rank: int = 0, world: int = 1, served_app: str | None = None):
        from flowbp_core.run import build_components, make_optimizer

        self.cfg, self.run_id, self.rank, self.world = cfg, run_id, rank, world
        # build_components seeds torch with train.seed: every rank (and every restart) builds the same LoRA init.
        # No text encoders: the conditioning comes in the caches.
        self.comp = build_components(cfg, with_reward=cfg.reward.placement == "colocated", trainable=True,
                                     text_encoders=False)
        self.backbone = self.comp.backbone
        self.score, self.client = components.build_score(cfg, self.comp, served_app)
        t = cfg.train
        self.guard = BadStepGuard(t.max_bad_steps)
        self.run_dir = Path(cfg.checkpoint.dir).absolute() / run_id
        self.sync = weight_sync.for_run(cfg)
        self.step = 0
        self.version = 0
        self.resumed_from: str | None = None
        dist = _dist()
        self.sharded = cfg.runtime.strategy == "fsdp" and dist is not None
        self.reducer = (NoReduce() if dist is None else FSDPReduce(dist, world) if self.sharded
                        else AllReduceMean(dist, world))

        path = self._resume_path()
        state = self._load_full(path) if path is not None and ckpt.layout(path) == ckpt.FULL else None
        if dist is not None:  # identical start on every rank whatever each one built
            for p in self.backbone.trainable_parameters():
                dist.broadcast(p.data, src=0)
        if self.sharded:
            sharding.shard_transformer(self.backbone.transformer)
        self.params = self.backbone.trainable_parameters()
        self.optimizer = make_optimizer(cfg, self.params)
        self.ema = EMA(self.params, t.ema_decay) if t.ema_decay is not None else None
        if state is not None:
            if state.optimizer is not None:
                self.optimizer.load_state_dict(state.optimizer)
                sharding.shard_optimizer_state(self.optimizer)
            if self.ema is not None and state.ema is not None:
                self.ema.load_state_dict({f"ema.{i}": sharding.place_like(state.ema[f"ema.{i}"].float(), s)
                                          for i, s in enumerate(self.ema.shadow)})
        elif path is not None:  # a sharded checkpoint: every rank reads its part (all of it when unsharded)
            st = ckpt.load_sharded(path, self.backbone.transformer, self.optimizer,
                                   self.ema.shadow if self.ema is not None else None)
            self.step, self.version, self.resumed_from = st.step, st.policy_version, str(path)

    def _resume_path(self) -> Path | None:
        """The checkpoint to resume from, chosen by rank 0 for every rank (listings differ: NFS caches, relative
        dirs); a rank that cannot see it raises."""
        path = ckpt.latest_complete(self.run_dir) if self.cfg.checkpoint.resume and self.rank == 0 else None
        step = -1 if path is None else int(path.name[len(ckpt.STEP_PREFIX):])
        dist = _dist()
        if dist is not None:
            step = broadcast_int(dist, step)
        if step < 0:
            return None
        path = ckpt.step_dir(self.run_dir, step)
        if not (path / ckpt.COMPLETE).exists():
            raise ConfigError("checkpoint.dir", self.cfg.checkpoint.dir,
                              f"a filesystem every learner rank shares (rank 0 resumes from {path}, which rank "
                              f"{self.rank} cannot see)")
        return path

    def _load_full(self, path: Path):
        """A `full` checkpoint's weights into the whole model (before sharding); the rest is loaded later."""
        st = ckpt.load_checkpoint(path)
        self.backbone.load_trainable_state_dict(st.trainable)
        self.step, self.version, self.resumed_from = st.step, st.policy_version, str(path)
        return st

    def full_trainable_state(self) -> dict[str, torch.Tensor]:
        """The trainable weights as full tensors on rank 0. Sharded: gathered one tensor at a time into rank 0's
        host memory, and other ranks get {} (they never hold a full copy); a collective, so call it on every
        rank. Unsharded: the live weights (aliases) on every rank."""
        return sharding.gather_state(self.backbone.trainable_state_dict(), rank0_only=True)

    def publish(self, generation: int, state: dict[str, torch.Tensor]):
        """Publish weights (rank 0): `state` is `full_trainable_state()`."""
        return self.sync.publish(state, self.version, generation)

    @torch.no_grad()
    def ema_trainable_state(self) -> dict[str, torch.Tensor]:
        """The EMA shadow as full tensors under the trainable state's keys, in the parameters' dtype (what a
        rollout worker would load). Swapped into the live parameters for the gather, then swapped back bitwise.
        The tensors alias the live parameters unless sharded: publish them before the next step. Collective when
        sharded: call it on every rank."""
        live = [p.detach().clone() for p in self.params]
        try:
            self.ema.copy_to_params()
            state = self.full_trainable_state()
            return state if self.sharded else {k: v.clone() for k, v in state.items()}
        finally:
            for p, b in zip(self.params, live):
                p.copy_(b)

    def fetch(self, work) -> tuple[TrajectoryCache, int]:
        """This rank's rows of the step (`fetch_rows`) and the bytes it fetched."""
        return fetch_rows(work, self.rank, self.world, self.cfg.train.batch_size)

    def train(self, step: int, cache: TrajectoryCache, timings: dict[str, float] | None = None) -> StepResult:
        """One step (flowbp_core.step.learn_step); raises NonFiniteStreak after too many bad steps in a row."""
        res = learn_step(cache, self.comp, step=step, optimizer=self.optimizer, ema=self.ema, score=self.score,
                         reducer=self.reducer, timings=timings)
        if not res.skipped:
            self.version += 1
        self.guard.observe(res)  # may raise NonFiniteStreak
        return res

    def save(self, step: int, res=None, trainable: dict[str, torch.Tensor] | None = None) -> str | None:
        """Write a checkpoint (returns its path on rank 0, None on other ranks); under FSDP every rank must call
        it. A full fine-tune under FSDP writes a `sharded` checkpoint (each rank its shards, nothing gathered);
        otherwise rank 0 writes a `full` one, under FSDP from tensors gathered to rank 0 alone. `trainable`:
        `full_trainable_state()` when the caller gathered it already (the learner loop publishes it)."""
        from flowbp_core.backbones import lora as lora_mod
        from flowbp_core.run import FullState, save, save_sharded

        transformer = self.backbone.transformer
        if self.sharded and not lora_mod.has_lora(transformer):
            path = save_sharded(self.comp, self.run_dir, step, self.version, self.optimizer, self.ema, res)
            return None if path is None else str(path)
        full = None
        if self.sharded:
            full = FullState(
                trainable=trainable if trainable is not None else self.full_trainable_state(),
                optimizer=sharding.gather_tree(self.optimizer.state_dict(), rank0_only=True),
                ema=sharding.gather_state(self.ema.state_dict(), rank0_only=True) if self.ema is not None else None,
                lora_export=sharding.gather_state(lora_mod.lora_state_for_diffusers(transformer), rank0_only=True))
        if self.rank != 0:
            return None
        return str(save(self.comp, self.run_dir, step, self.version, self.optimizer, self.ema, res, full=full))


def eval_steps(cfg: RunConfig) -> set[int]:
    """The steps done after which the driver evaluates (the learner publishes the EMA shadow at those)."""
    e, n = cfg.eval, cfg.train.steps
    if e.limit <= 0:
        return set()
    return set(range(e.every, n + 1, e.every)) | {n} if e.every > 0 else {n}


def learner_loop(config: dict) -> None:
    """Ray Train's train_loop_per_worker."""
    import ray.train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = RunConfig.model_validate_json(config["cfg_json"])
    board = config["board"]
    if rank == 0:  # the group's ranks hold their resources now: the driver places the rollout workers after them
        ray.get(board.mark_placed.remote())
    torch.set_num_threads(max(1, int(cfg.runtime.learner_num_cpus)))
    learner = LearnerRank(cfg, config["run_id"], rank, world, config.get("served_app"))  # resumes, shards if FSDP
    generation = ray.get(board.next_generation.remote()) if rank == 0 else 0
    dist = _dist()
    if dist is not None:
        generation = broadcast_int(dist, generation)
    state = learner.full_trainable_state()  # every rank: a collective under FSDP
    if rank == 0:
        weights = learner.publish(generation, state)
        ray.get(board.say_hello.remote(LearnerHello(
            generation=generation, start_step=learner.step, policy_version=learner.version, weights=weights,
            pids=(os.getpid(),), resumed_from=learner.resumed_from)))
    cp = cfg.checkpoint
    evals = eval_steps(cfg)
    step = learner.step
    while step < cfg.train.steps:
        work = None
        while work is None:
            work = ray.get(board.take.remote(step, generation))
        if work == STOP:
            return
        timings: dict[str, float] = {}
        with timed(TRANSFER, timings):
            cache, nbytes = learner.fetch(work)
        fetched = gather_ints(dist, nbytes, world)
        staleness, samples = learner.version - cache.policy_version, cache.batch_size * world
        try:
            res = learner.train(step, cache, timings)
        except NonFiniteStreak as e:  # the streak's last step: skipped for its own reason, and failed
            if rank == 0:
                nan = float("nan")
                ray.get(board.report.remote(StepOutcome(
                    step=step, generation=generation, loss=nan, reward_mean=nan, grad_norm=nan, residual=nan,
                    skipped=True, skip_reason=e.reason, policy_version=learner.version,
                    staleness=staleness, samples=samples, phase_seconds=timings, weights=None,
                    checkpoint=None, failed=str(e), fetched_bytes=fetched)))
            return
        del cache  # the rows (views pinning their pieces in the object store) are not kept past the step
        step += 1
        ckpt_path = None
        state = learner.full_trainable_state() if not res.skipped else None  # every rank: a collective under FSDP
        if state is not None and (step % cp.every == 0 or step == cfg.train.steps):
            ckpt_path = learner.save(step, res, trainable=state)  # every rank (FSDP: shards or a gather to rank 0)
        eval_weights = None
        if learner.ema is not None and step in evals:  # the driver evaluates the EMA shadow (every rank: FSDP gathers)
            ema_state = learner.ema_trainable_state()
            if rank == 0:
                eval_weights = replace(learner.publish(generation, ema_state), eval_only=True)
        if dist is not None:
            dist.barrier()  # nobody runs ahead of a checkpoint being written
        if rank == 0:
            weights = None
            if state is not None:
                with timed(SYNC, timings):
                    weights = learner.publish(generation, state)
            ray.get(board.report.remote(StepOutcome(
                step=res.step, generation=generation, loss=res.loss, reward_mean=res.reward_mean,
                grad_norm=res.grad_norm, residual=float(res.diagnostics.get("residual_0", float("nan"))),
                skipped=res.skipped, skip_reason=res.skip_reason or "", policy_version=learner.version,
                staleness=staleness, samples=samples, phase_seconds=res.timings, weights=weights,
                checkpoint=ckpt_path, eval_weights=eval_weights, fetched_bytes=fetched)))


def torch_backend(use_gpu: bool) -> str:
    """The learner group's backend: NCCL for CUDA tensors plus gloo for any CPU tensor on a GPU run."""
    return "cpu:gloo,cuda:nccl" if use_gpu else "gloo"


def rank_resources(cfg: RunConfig) -> dict[str, float]:
    """What each learner rank asks Ray for: its CPUs, its GPUs (`placement.role_gpus`; none: no GPU key) and its
    role's resource."""
    gpus = role_gpus(cfg, "learner")
    return {"CPU": cfg.runtime.learner_num_cpus, **({"GPU": gpus} if gpus > 0 else {}),
            **role_resources(cfg, "learner")}


def make_trainer(cfg: RunConfig, run_id: str, board, served_app: str | None, storage_path: str):
    from ray.train import FailureConfig, RunConfig as TrainRunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    rt = cfg.runtime
    resources = rank_resources(cfg)
    return TorchTrainer(
        learner_loop,
        train_loop_config={"cfg_json": cfg.model_dump_json(), "board": board, "run_id": run_id,
                           "served_app": served_app},
        scaling_config=ScalingConfig(num_workers=rt.learners, use_gpu="GPU" in resources,
                                     resources_per_worker=resources),
        torch_config=TorchConfig(backend=torch_backend(rt.use_gpu)),
        run_config=TrainRunConfig(name=f"learner-{run_id}", storage_path=storage_path,
                                  failure_config=FailureConfig(max_failures=rt.max_actor_restarts)),
    )
