"""FSDP for the learner group (`runtime.strategy: fsdp`): shard the transformer over the learner ranks with
PyTorch's per-parameter FSDP (`torch.distributed.fsdp.fully_shard`, "FSDP2"), and move state between the
sharded live model and the full tensors that checkpoints, exports and weight sync carry.

Why FSDP2 and not DDP or FSDP1: the methods call the transformer several times per step (K re-forwards), and
with LoRA a block mixes frozen and trainable weights. FSDP2 handles both (every forward all-gathers the block,
the backward reduce-scatters the mean gradient of the parameters that have one), with plain DTensors as
parameters, so the optimizer, gradient clipping and the EMA work on shards unchanged.

What is sharded: each block of every `ModuleList` directly under the transformer (SD3's `transformer_blocks`,
FLUX's `transformer_blocks` and `single_transformer_blocks`), then the transformer itself (embeddings, norms,
projections). Text encoders, the VAE and colocated reward models stay whole on every rank: they are frozen,
and the learner uses them only through the transformer's inputs and the decoded sample.

Collectives: turning a shard into its full tensor (`gather`) is a collective. Every rank must call the same
gathers in the same order, so checkpoints, exports and weight publishes gather on every rank and only rank 0
keeps the result: `gather_state(..., rank0_only=True)` gathers one tensor at a time, moves it to the CPU on rank
0 and drops it elsewhere, so a non-zero rank never holds more than one full tensor and rank 0's full copy lives
in host memory. Everything here is a no-op on unsharded tensors, so the DDP and single-process paths share the
code. Full fine-tuning checkpoints are not gathered at all: each rank writes its shards (`flowbp_core.checkpoint`,
torch distributed checkpoint).
"""

from __future__ import annotations

from typing import Any

import torch


def _dtensor_type():
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(t: Any) -> bool:
    return isinstance(t, _dtensor_type())


def shard_transformer(transformer: torch.nn.Module) -> int:
    """Apply `fully_shard` to every block, then to the transformer; returns the number of FSDP units.

    Needs an initialised process group of more than one rank (Ray Train's). Parameters are replaced by sharded
    ones: take `trainable_parameters()` (and build the optimizer and EMA) only after this call."""
    from torch.distributed.fsdp import fully_shard

    units = 0
    for child in transformer.children():
        if isinstance(child, torch.nn.ModuleList):
            for block in child:
                fully_shard(block)
                units += 1
    fully_shard(transformer)
    return units + 1


def gather(t: torch.Tensor) -> torch.Tensor:
    """The full tensor of a shard (collective), detached; unsharded tensors pass through."""
    return t.full_tensor().detach() if is_sharded(t) else t


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _gather_kept(t: torch.Tensor, keep: bool) -> torch.Tensor | None:
    """`gather(t)`, moved to the CPU, where `keep`; None elsewhere (the full tensor is freed at once)."""
    if not is_sharded(t):
        return t
    full = t.full_tensor().detach()
    return full.cpu() if keep else None


def gather_state(sd: dict[str, torch.Tensor], rank0_only: bool = False) -> dict[str, torch.Tensor]:
    """`gather` over a state dict, in key order (the same on every rank). `rank0_only`: the sharded tensors'
    full copies go to the CPU on rank 0, and other ranks return without them (an empty dict when all are
    sharded); unsharded tensors pass through on every rank."""
    keep = not rank0_only or _rank() == 0
    out = {}
    for k, v in sd.items():
        g = _gather_kept(v, keep)
        if g is not None:
            out[k] = g
    return out


def gather_tree(obj: Any, rank0_only: bool = False) -> Any:
    """`gather` over a nested structure (an optimizer's state_dict: dicts, lists, tensors, numbers); with
    `rank0_only`, None on other ranks (the gathers still run there, one tensor at a time)."""
    keep = not rank0_only or _rank() == 0

    def walk(o: Any) -> Any:
        if isinstance(o, torch.Tensor):
            return _gather_kept(o, keep) if rank0_only else gather(o)
        if isinstance(o, dict):
            return {k: walk(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return type(o)(walk(v) for v in o)
        return o

    out = walk(obj)
    return out if keep else None


def place_like(full: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """`full` laid out as `ref`: sharded the same way when `ref` is a shard (collective), else as is."""
    if not is_sharded(ref):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(device=ref.to_local().device), ref.device_mesh, ref.placements)


@torch.no_grad()
def shard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After `optimizer.load_state_dict(full_state)` on sharded parameters, shard the per-element state
    (Adam's moments) like the parameter it belongs to; scalars (`step`) stay as they are."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p)
            if not state or not is_sharded(p):
                continue
            for k, v in list(state.items()):
                if isinstance(v, torch.Tensor) and not is_sharded(v) and tuple(v.shape) == tuple(p.shape):
                    state[k] = place_like(v.to(p.dtype), p)
