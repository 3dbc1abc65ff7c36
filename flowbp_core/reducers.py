"""How one learner step combines its ranks: a `Reducer` agrees on skipping, averages the reported loss and
reward, and combines the gradients, returning their global norm. `learn_step` calls it at the same points on
every rank, so the collectives line up.

- `NoReduce`: one process (the single-process loop, or a learner group of one).
- `AllReduceMean`: data-parallel ranks with whole parameters: one all-reduce per flattened bucket averages the
  gradients (what DDP computes; the methods re-forward the transformer several times per step, which DDP's
  one-forward-one-backward bucketing does not allow).
- `FSDPReduce`: a transformer sharded with FSDP2: its backward already reduce-scattered the mean gradient, so
  only the norm of the shards is combined.
"""

from __future__ import annotations

from typing import Protocol

import torch

GRAD_BUCKET_BYTES = 32 * 2**20


def local_part(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a tensor: the local shard of a sharded one (a DTensor, under FSDP), else itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def norm_of(grads: list[torch.Tensor]) -> float:
    """The 2-norm of all `grads` together (0.0 for none)."""
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))


def collective_device(dist) -> torch.device:
    """The device of the group's small collectives: the current CUDA device when the group has an NCCL backend
    (NCCL reduces CUDA tensors only), else the CPU (gloo)."""
    if "nccl" in str(dist.get_backend()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_sum(dist, values: list[float]) -> list[float]:
    """The sums over ranks of a few numbers (one all-reduce of one float64 tensor on the group's device)."""
    t = torch.tensor(values, dtype=torch.float64, device=collective_device(dist))
    dist.all_reduce(t)
    return t.tolist()


def grad_buckets(tensors: list[torch.Tensor], bucket_bytes: int = GRAD_BUCKET_BYTES) -> list[list[torch.Tensor]]:
    """Consecutive tensors of one dtype and device, at most `bucket_bytes` a bucket (a bigger tensor alone)."""
    out: list[list[torch.Tensor]] = []
    cur: list[torch.Tensor] = []
    size = 0
    for t in tensors:
        n = t.numel() * t.element_size()
        if cur and (size + n > bucket_bytes or t.dtype != cur[0].dtype or t.device != cur[0].device):
            out.append(cur)
            cur, size = [], 0
        cur.append(t)
        size += n
    if cur:
        out.append(cur)
    return out


def all_reduce_mean(dist, tensors: list[torch.Tensor], world: int, bucket_bytes: int = GRAD_BUCKET_BYTES) -> int:
    """Average `tensors` over the ranks in place: one all-reduce per flattened bucket (a call per tensor pays the
    collective's latency hundreds of times a step). Returns the number of all-reduces."""
    buckets = grad_buckets(tensors, bucket_bytes)
    for bucket in buckets:
        flat = torch.cat([t.reshape(-1) for t in bucket])
        dist.all_reduce(flat)
        flat.div_(world)
        offset = 0
        for t in bucket:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()
    return len(buckets)


class Reducer(Protocol):
    def agree(self, ok: bool, loss: float, reward: float) -> tuple[bool, float, float]:
        """(every rank ok, the mean loss, the mean reward over ranks); called before backward on every rank."""
        ...

    def gradients(self, params: list[torch.nn.Parameter]) -> float:
        """Combine the gradients of `params` over ranks in place; the global gradient norm (same on every rank)."""
        ...


class NoReduce:
    """One process: nothing to agree with; the gradient is this rank's."""

    def agree(self, ok: bool, loss: float, reward: float) -> tuple[bool, float, float]:
        return ok, loss, reward

    def gradients(self, params: list[torch.nn.Parameter]) -> float:
        return norm_of([local_part(p.grad) for p in params if p.grad is not None])


class _Group:
    def __init__(self, dist, world: int):
        self.dist, self.world = dist, world

    def agree(self, ok: bool, loss: float, reward: float) -> tuple[bool, float, float]:
        # the group's loss and reward are the means over ranks (equal shards), as one rank would report
        bad, loss_sum, reward_sum = all_sum(self.dist, [0.0 if ok else 1.0, loss, reward])
        return bad == 0, loss_sum / self.world, reward_sum / self.world


class AllReduceMean(_Group):
    """Data-parallel ranks with whole parameters: average every gradient (a missing one counts as zero)."""

    def gradients(self, params: list[torch.nn.Parameter]) -> float:
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        all_reduce_mean(self.dist, [p.grad for p in params], self.world)
        return norm_of([p.grad for p in params])


class FSDPReduce(_Group):
    """An FSDP-sharded model: each rank holds its shard of the mean gradient; combine the shards' squared norms."""

    def gradients(self, params: list[torch.nn.Parameter]) -> float:
        dev = collective_device(self.dist)
        sq = torch.zeros((), dtype=torch.float64, device=dev)
        for p in params:
            if p.grad is not None:
                sq += local_part(p.grad).double().pow(2).sum().to(dev)
        self.dist.all_reduce(sq)
        return float(sq.sqrt())
