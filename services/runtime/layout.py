"""Bytes one training step moves between the roles of a run, computed from the real model sizes.

The trajectory cache's bytes come from serializing a one-sample cache of zeros with the real shapes and dtypes
(`TrajectoryCache.to_bytes`, as a rollout worker does); the kept states and velocities from the method's own plans;
the weights from the transformer built on the meta device (no memory, no download). The README's table of a
64-GPU run is `python -m services.runtime.layout`, and a test holds the two equal.
"""

from __future__ import annotations

import argparse
import functools
import importlib
from dataclasses import dataclass
from pathlib import Path

import torch

from flowbp_core.cache import TrajectoryCache
from flowbp_core.config import RunConfig, load_config
from flowbp_core.training import generator_for
from services.runtime import weight_sync

_BACKBONES = {"sd3": ("flowbp_core.backbones.sd3", "SD3Transformer2DModel"),
              "flux1": ("flowbp_core.backbones.flux1", "FluxTransformer2DModel")}
_REPO = Path(__file__).resolve().parents[2]
_VAE_FACTOR = 8
_BF16 = 2
_FP32 = 4


@dataclass(frozen=True, kw_only=True)
class Roles:
    """GPUs per role in a run of `nodes` x `gpus_per_node` (Ray's object store keeps one copy of an object per node
    that reads it, so bytes cross the network once per reading node, not once per reading actor)."""

    learners: int = 16
    rollout_workers: int = 40
    reward_replicas: int = 8
    gpus_per_node: int = 8

    @property
    def gpus(self) -> int:
        return self.learners + self.rollout_workers + self.reward_replicas

    def nodes(self, gpus: int) -> int:
        return -(-gpus // self.gpus_per_node)


@dataclass(frozen=True, kw_only=True)
class StepBytes:
    """What one step of `batch` samples moves, in bytes.

    Attributes:
        cache_per_sample (int): one sample's trajectory cache (latents, kept states/velocities, text conditioning).
        cache_step (int): the step's caches, put by the rollout workers: one piece per learner rank each shard
            covers (`rank_pieces`), each piece carrying the shared negative-prompt embedding once.
        cache_network (int): those pieces pulled to the learner nodes: each piece by the one node whose rank reads
            it.
        cache_per_rank (int): the most any learner rank fetches: its own pieces, read in place from its node's
            object store.
        weights (int): one weights publish by learner rank 0 (`full_state` bf16, or `lora_delta` fp32).
        weights_network (int): that publish pulled to the rollout workers: `lora_delta` one copy per node (a
            node's workers share it), `full_state` at most one copy per worker (workers reading in step share a
            bucket object, one that falls behind gets its own).
        weights_store (int): the most weight bytes the object store on rank 0's node pins: `lora_delta` two
            versions (the newest and the learner generation's first), `full_state` at most
            `weight_sync.IN_FLIGHT` buckets for the publisher, for its server and for each rollout worker.
        reward_per_rank (int): the latents a learner rank sends the reward service (the same again back as dr/dz).
    """

    cache_per_sample: int
    cache_step: int
    cache_network: int
    cache_per_rank: int
    weights: int
    weights_network: int
    weights_store: int
    reward_per_rank: int


def shard_bounds(batch: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) slices of `batch` over at most `parts` workers (no empty slice)."""
    parts = max(1, min(parts, batch))
    base, extra = divmod(batch, parts)
    out, start = [], 0
    for i in range(parts):
        n = base + (1 if i < extra else 0)
        out.append((start, start + n))
        start += n
    return out


def rank_pieces(start: int, end: int, batch: int, learners: int) -> list[tuple[int, int, int]]:
    """Rows [start, end) of the batch cut at the learner ranks' bounds (`shard_bounds(batch, learners)`): the
    (start, end, rank) pieces, in order, that a rollout shard returns so that each rank fetches only its rows."""
    return [(max(start, a), min(end, b), r) for r, (a, b) in enumerate(shard_bounds(batch, learners))
            if max(start, a) < min(end, b)]


def _module(backbone: str):
    if backbone not in _BACKBONES:
        raise ValueError(f"backbone {backbone!r}: the layout knows {sorted(_BACKBONES)}")
    return importlib.import_module(_BACKBONES[backbone][0])


def _true_cfg(cfg: RunConfig) -> bool:
    """True CFG: the cache carries the negative prompt's embedding once per shard."""
    return _module(cfg.backbone.name).PRESET.guidance.mode == "true"


@functools.lru_cache(maxsize=None)
def _kept(cfg_json: str, steps: int) -> tuple[float, float]:
    return kept_latents(RunConfig.model_validate_json(cfg_json), steps)


def kept_latents(cfg: RunConfig, steps: int = 64) -> tuple[float, float]:
    """(states, velocities) the method's plans keep per sample, averaged over the first `steps` plans."""
    from flowbp_core import methods

    method = methods.build(cfg.method.name, backbone=cfg.method_preset(), **cfg.method.params)
    n = cfg.sampling.n_steps
    counts = [method.needs(method.plan(n, generator_for(cfg.train.seed, s, "plan")), n) for s in range(steps)]
    return (sum(len(c.states) for c in counts) / steps, sum(len(c.velocities) for c in counts) / steps)


def _cond(backbone: str, batch: int, with_negative: bool) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(per-sample conditioning, shared negative-prompt conditioning) at the real sizes, bf16."""
    text = _module(backbone).REAL_TEXT
    per = {"prompt_embeds": torch.zeros(batch, text["seq_len"], text["dim"], dtype=torch.bfloat16),
           "pooled": torch.zeros(batch, text["pooled_dim"], dtype=torch.bfloat16)}
    shared = {"neg_prompt_embeds": torch.zeros(1, text["seq_len"], text["dim"], dtype=torch.bfloat16),
              "neg_pooled": torch.zeros(1, text["pooled_dim"], dtype=torch.bfloat16)} if with_negative else {}
    return per, shared


def real_cache(cfg: RunConfig, px: int, samples: int, states: int, velocities: int,
               fill: float = 0.0) -> TrajectoryCache:
    """A cache of `samples` samples at `px` pixels with that many kept states and velocities, every tensor at its
    real shape and dtype (bf16; the final latent float32, as `sampling.rollout` keeps it), latents set to `fill`."""
    latent = (samples, 16, px // _VAE_FACTOR, px // _VAE_FACTOR)
    zeros = lambda dtype: torch.full(latent, fill, dtype=dtype)  # noqa: E731 - one shape, two dtypes
    per, shared = _cond(cfg.backbone.name, samples, _true_cfg(cfg))
    return TrajectoryCache(noise=zeros(torch.bfloat16), states={i + 1: zeros(torch.bfloat16) for i in range(states)},
                           velocities={i: zeros(torch.bfloat16) for i in range(velocities)},
                           sigmas=torch.linspace(1, 0, cfg.sampling.n_steps + 1, dtype=torch.float64),
                           final=zeros(torch.float32), seed=0, policy_version=0, cond={**per, **shared},
                           prompts=["x" * 64] * samples)


def cache_bytes(cfg: RunConfig, px: int, samples: int, states: int, velocities: int) -> int:
    """The serialized bytes of `real_cache(cfg, px, samples, states, velocities)`."""
    return len(real_cache(cfg, px, samples, states, velocities).to_bytes())


@functools.lru_cache(maxsize=None)
def transformer_params(backbone: str, lora_rank: int | None) -> int:
    """Trainable parameters of the real transformer: all of them, or a LoRA of `lora_rank` on the backbone's
    default targets (r x (in + out) per adapted linear)."""
    import diffusers

    from flowbp_core import backbones

    mod = _module(backbone)
    with torch.device("meta"):
        model = getattr(diffusers, _BACKBONES[backbone][1])(**mod.REAL_TRANSFORMER)
    if lora_rank is None:
        return sum(p.numel() for p in model.parameters())
    targets = backbones.get(backbone).default_lora_targets
    linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
               and any(n == t or n.endswith("." + t) for t in targets)]
    return sum(lora_rank * (m.in_features + m.out_features) for m in linears)


def step_bytes(cfg: RunConfig, px: int, roles: Roles, lora_rank: int | None = None) -> StepBytes:
    """The bytes of one step of `cfg` (its batch, method and backbone) at `px` pixels over `roles`."""
    states, vels = _kept(cfg.model_dump_json(), 64)
    s_lo, v_lo = int(states), int(vels)
    b = cfg.train.batch_size
    # Kept counts vary by plan: interpolate between the whole counts around the mean.
    one = cache_bytes(cfg, px, 1, s_lo, v_lo)
    latent_bf16 = 16 * (px // _VAE_FACTOR) ** 2 * _BF16
    per_sample = round(one + ((states - s_lo) + (vels - v_lo)) * latent_bf16)
    shared = sum(t.numel() * t.element_size() for t in _cond(cfg.backbone.name, 1, True)[1].values()) \
        if _true_cfg(cfg) else 0
    pieces = [p for a, e in shard_bounds(b, roles.rollout_workers) for p in rank_pieces(a, e, b, roles.learners)]
    rank = [sum((e - a) * (per_sample - shared) + shared for a, e, r in pieces if r == i)
            for i in range(roles.learners)]
    step = sum(rank)
    weights = transformer_params(cfg.backbone.name, lora_rank) * (_FP32 if lora_rank is not None else _BF16)
    rt = cfg.runtime
    window = weight_sync.IN_FLIGHT * int(rt.weight_sync_bucket_mb * 2**20)
    lora = lora_rank is not None
    return StepBytes(cache_per_sample=per_sample, cache_step=step, cache_network=step,
                     cache_per_rank=max(rank), weights=weights,
                     weights_network=weights * (roles.nodes(roles.rollout_workers) if lora else roles.rollout_workers),
                     weights_store=2 * weights if lora else min(2 * weights, (2 + roles.rollout_workers) * window),
                     reward_per_rank=b // roles.learners * latent_bf16 * _FP32 // _BF16)


def _fmt(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def table(configs: dict[str, str], roles: Roles = Roles(), lora_rank: int = 64) -> str:
    """The README's markdown table: per model (name -> run file, relative to the repo) and resolution, the bytes
    of one step over `roles`."""
    ln, rn = roles.nodes(roles.learners), roles.nodes(roles.rollout_workers)
    rows = [f"| model | px | cache / sample | caches / step | to {ln} learner nodes | fetched by a learner rank | "
            f"weights: full / LoRA r{lora_rank} | to {roles.rollout_workers} rollout workers ({rn} nodes): full (at "
            "most) / LoRA | weights pinned in rank 0's store: full / LoRA | reward latents / rank |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for name, path in configs.items():
        cfg = load_config(_REPO / path)
        for px in (512, 1024):
            full = step_bytes(cfg, px, roles)
            lora = step_bytes(cfg, px, roles, lora_rank)
            rows.append(f"| {name} | {px} | {_fmt(full.cache_per_sample)} | {_fmt(full.cache_step)} | "
                        f"{_fmt(full.cache_network)} | {_fmt(full.cache_per_rank)} | "
                        f"{_fmt(full.weights)} / {_fmt(lora.weights)} | "
                        f"{_fmt(full.weights_network)} / {_fmt(lora.weights_network)} | "
                        f"{_fmt(full.weights_store)} / {_fmt(lora.weights_store)} | "
                        f"{_fmt(full.reward_per_rank)} |")
    return "\n".join(rows)


DEPLOY_CONFIGS = {"SD3.5-M (FlowBP-Sparse)": "deploy/configs/sd35.yaml",
                  "FLUX.1-dev (FlowBP-Lagrange)": "deploy/configs/flux1.yaml"}


def main() -> None:
    argparse.ArgumentParser(description=__doc__).parse_args()
    print(table(DEPLOY_CONFIGS))


if __name__ == "__main__":
    main()
