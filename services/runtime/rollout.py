"""RolloutWorker: a Ray actor holding a frozen copy of the backbone that turns prompt batches into
`TrajectoryCache`s (safetensors bytes in the object store), compacted to what the method's plan needs.

A shard comes back in pieces cut at the learner ranks' bounds (the request's `cuts`), one object each, so a
learner rank fetches only its own rows. Each piece is a numpy uint8 array: Ray stores it out of band and a
reader's `ray.get` maps it from the object store without a copy (`TrajectoryCache.from_buffer`).

With LoRA the worker holds no adapter: each sync folds the synced adapter into the base weights
(`backbones.lora.MergedLoRA`: W0 + delta from a kept copy of W0, so a sync replaces the previous delta), and
sampling runs the plain model. A shard goes through the transformer `runtime.rollout_batch` samples at a time;
with `runtime.compile_rollout` the transformer is compiled in place with static shapes (CUDA graphs on a GPU),
so a sync copies into the tensors the graph reads and the padded micro-batches reuse one graph.

Why the request names its weights: a worker that was killed and restarted by Ray comes back with the base
weights; because every request carries the `WeightsHandle` it must be sampled with, the restarted worker
catches up on its first request, and a retried request produces the same cache (noise is seeded per sample).
A shard takes its rows of the step's full noise batch, so the caches do not depend on how many workers
share a step.
"""

from __future__ import annotations

import os

import numpy as np
import ray
import torch

from flowbp_core.config import RunConfig
from flowbp_core.dtypes import resolve_dtype
from flowbp_core.sampling import compile_for_sampling, micro_batched
from flowbp_core.sampling import rollout as cached_rollout
from flowbp_core.stages import ROLLOUT, timed
from flowbp_core.step import rollout_step, step_noise
from services.runtime.payloads import RolloutRequest, RolloutStats
from services.runtime.placement import role_gpus, role_resources
from services.runtime.weight_sync import WeightReceiver


class RolloutCore:
    """The worker's logic without Ray (used by the actor, by the benchmark's stage-alone timing and in tests).

    A rollout is `flowbp_core.step.rollout_step` with the request's plan (drawn once by the driver): a shard
    [a, b) takes rows a..b-1 of the step's noise, so one worker reproduces the single-process loop bitwise and
    any number of workers joins into the same batch.
    """

    def __init__(self, cfg: RunConfig, worker: int = 0):
        from flowbp_core.run import build_components, lora_config

        self.cfg = cfg
        self.worker = worker
        lora = cfg.backbone.finetune == "lora"
        # LoRA: a plain backbone whose adapted weights each sync sets to W0 + delta (MergedLoRA), so sampling runs
        # no adapter; full fine-tuning: the trainable flags name the synced keys (sampled under no_grad).
        self.comp = build_components(cfg, with_reward=False, trainable=not lora)
        self.backbone = self.comp.backbone
        self.merged = self.backbone.merged_lora(lora_config(cfg)) if lora else None
        self.load = self.merged.load if lora else self.backbone.load_trainable_state_dict
        self.state_dtype = resolve_dtype(cfg.backbone.dtype)
        self.receiver = WeightReceiver()
        self.static = cfg.runtime.compile_rollout
        if self.static:
            # The straight-through pin keeps the reward's input exact whatever the rollout's numerics, so the
            # rollout may run a compiled transformer; the learner re-forwards eagerly.
            compile_for_sampling(self.backbone.transformer, cuda_graphs=cfg.runtime.rollout_cuda_graphs)

    def run(self, req: RolloutRequest, offset: int = 0,
            cuts: tuple[tuple[int, int], ...] | None = None) -> tuple[list[np.ndarray], RolloutStats]:
        """Sample rows [offset, offset + len(req.prompts)) of the step's batch; the serialized cache cut into the
        pieces `cuts` names ([start, end) rows of the step's batch, in order, covering the shard; None: one
        piece)."""
        if req.plan is None:
            raise ValueError(f"RolloutRequest.plan is None for step {req.step}: a training rollout is issued with its "
                             "step's plan (flowbp_core.step.step_plan)")
        end = offset + len(req.prompts)
        cuts = ((offset, end),) if cuts is None else tuple(cuts)
        if [a for a, _ in cuts] + [end] != [offset] + [b for _, b in cuts] or any(a >= b for a, b in cuts):
            raise ValueError(f"cuts {cuts}: contiguous non-empty [start, end) rows from {offset} to {end}")
        sync_s = self.receiver.apply(req.weights, self.load)
        timings: dict[str, float] = {}
        with timed(ROLLOUT, timings):
            cache = rollout_step(backbone=self.backbone, guidance=self.comp.guidance, plan=req.plan,
                                 prompts=list(req.prompts), seed=req.seed, step=req.step,
                                 policy_version=max(self.receiver.version, 0), state_dtype=self.state_dtype,
                                 device=self.comp.device, offset=offset, total=req.total_batch,
                                 meta={"step": str(req.step), "worker": str(self.worker), "offset": str(offset)},
                                 micro_batch=self.cfg.runtime.rollout_batch, static=self.static)
            whole = len(cuts) == 1
            pieces = [np.frombuffer((cache if whole else cache.rows(a - offset, b - offset)).to_bytes(), np.uint8)
                      for a, b in cuts]
        stats = RolloutStats(step=req.step, worker=self.worker, pid=os.getpid(), policy_version=cache.policy_version,
                             samples=len(req.prompts), piece_nbytes=tuple(p.nbytes for p in pieces),
                             rollout_seconds=timings[ROLLOUT], sync_seconds=sync_s)
        return pieces, stats

    @torch.no_grad()
    def eval_images(self, req: RolloutRequest, offset: int = 0) -> torch.Tensor:
        """Sample `req.prompts` with the request's weights (keeping no trajectory) and decode them. Eval-only
        weights (the learner's EMA shadow) are loaded for this call alone: the receiver forgets what it held, so
        the next rollout reloads the live weights its request names."""
        from flowbp_core.backbones.base import eval_schedule
        from flowbp_core.cache import CacheNeeds

        w = req.weights
        if w is not None and w.eval_only:
            self.receiver.apply_once(w, self.load)
        else:
            self.receiver.apply(w, self.load)
        prompts = list(req.prompts)
        cond = self.backbone.encode_prompts(prompts)
        n = self.cfg.sampling.eval_n_steps or self.comp.n_steps
        noise = step_noise(self.backbone, req.seed, req.step, req.total_batch, offset, len(prompts))
        velocity = micro_batched(lambda c: self.backbone.bind(c, self.comp.guidance), cond, len(prompts),
                                 self.cfg.runtime.rollout_batch, static=self.static)
        cache = cached_rollout(velocity, noise.to(self.comp.device),
                               eval_schedule(self.backbone, n).sigmas, cond=cond, prompts=prompts,
                               needs=CacheNeeds(frozenset(), frozenset()))
        return self.backbone.decode(cache.final.to(self.backbone.dtype))

    def evaluate(self, req: RolloutRequest, score_app: str, offset: int = 0) -> list[float]:
        """`eval_images`, scored on the score-only reward deployment `score_app`. Returns one score per prompt."""
        from services.reward_serve.client import ServedRewardClient

        images = self.eval_images(req, offset)
        client = ServedRewardClient(score_app, kind="images")
        return [float(r) for r in client.call(images.float(), list(req.prompts), want_grad=False).rewards]


@ray.remote
class RolloutWorker:
    def __init__(self, cfg_json: str, worker: int, num_threads: int = 1):
        torch.set_num_threads(max(1, num_threads))
        self.core = RolloutCore(RunConfig.model_validate_json(cfg_json), worker)

    @ray.method(num_returns=2)
    def rollout(self, req: RolloutRequest, offset: int = 0, cuts: tuple[tuple[int, int], ...] | None = None):
        """The shard's pieces, one object each, then its stats: call with `.options(num_returns=len(cuts) + 1)`."""
        pieces, stats = self.core.run(req, offset, cuts)
        return (*pieces, stats)

    def evaluate(self, req: RolloutRequest, score_app: str, offset: int = 0) -> list[float]:
        return self.core.evaluate(req, score_app, offset)

    def pid(self) -> int:
        return os.getpid()

    def version(self) -> int:
        return self.core.receiver.version


def actor_options(cfg: RunConfig) -> dict:
    """What each rollout worker asks Ray for: its CPUs, its GPUs (`placement.role_gpus`), its role's resource,
    and restarts with its in-flight call retried."""
    rt = cfg.runtime
    return dict(num_cpus=rt.rollout_num_cpus, num_gpus=role_gpus(cfg, "rollout"),
                resources=role_resources(cfg, "rollout"),
                max_restarts=rt.max_actor_restarts, max_task_retries=rt.max_actor_restarts)


def spawn(cfg: RunConfig, n: int, name_prefix: str | None = None) -> list:
    """Start `n` workers; Ray restarts a dead one (max_actor_restarts) and retries its in-flight call."""
    rt = cfg.runtime
    opts = actor_options(cfg)
    cfg_json = cfg.model_dump_json()
    workers = []
    for i in range(n):
        o = dict(opts)
        if name_prefix:
            o["name"] = f"{name_prefix}-rollout-{i}"
        workers.append(RolloutWorker.options(**o).remote(cfg_json, i, max(1, int(rt.rollout_num_cpus))))
    return workers
