"""Weight sync: how the learner's trainable weights reach the rollout workers (a registry of backends).

- `lora_delta` (the default when the backbone trains a LoRA adapter): the adapter *is* the delta from the frozen base,
  a few MB, so it goes through the object store as one safetensors blob.
- `full_state` (full fine-tuning): the full trainable state (under FSDP gathered into rank 0's host memory alone)
  is cut into buckets of `bucket_mb`, each copied, serialized and put in turn, so the publish holds one bucket's
  copy beside the state, no single object needs the whole model's size in one contiguous allocation, and a
  worker can start reading the first bucket while later ones are still being put. The whole model still goes
  through the object store every step (see services/runtime/README.md for the bytes).

Blobs are put as numpy uint8 arrays, so a worker's `ray.get` maps each from its node's object store and reads the
tensors in place (`flowbp_core.wire`) before copying them into its weights: no copy of a bucket in the worker's
own memory, and the workers of a node share the node's one copy.

Every publish carries a `policy_version` (the learner step count), and a worker applies a handle only when its
version is newer than what it holds: a restarted worker therefore catches up from the next request, which always
names the weights it must be sampled with. Publish and apply are timed; both feed `flowbp_weight_sync_seconds`.
"""

from __future__ import annotations

import time
from typing import Callable, Protocol

import numpy as np
import ray
import torch
from safetensors.torch import save as st_save

from flowbp_core.errors import ConfigError
from flowbp_core.wire import read_views
from services.runtime.payloads import WeightsHandle


class WeightSync(Protocol):
    name: str

    def publish(self, state: dict[str, torch.Tensor], policy_version: int, generation: int) -> WeightsHandle: ...

    def fetch(self, handle: WeightsHandle) -> dict[str, torch.Tensor]: ...


_REGISTRY: dict[str, Callable[..., WeightSync]] = {}


def register(name: str):
    def deco(factory):
        _REGISTRY[name] = factory
        return factory

    return deco


def names() -> list[str]:
    return sorted(_REGISTRY)


def build(name: str, **kw) -> WeightSync:
    if name not in _REGISTRY:
        raise ConfigError("runtime.weight_sync", name, f"one of {names()}")
    return _REGISTRY[name](**kw)


def backend_name(weight_sync: str, finetune: str) -> str:
    """The backend `runtime.weight_sync` names; `auto` is the LoRA delta with LoRA, else the full state."""
    if weight_sync != "auto":
        return weight_sync
    return "lora_delta" if finetune == "lora" else "full_state"


def _to_cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage and non-contiguous views; a detached contiguous CPU copy of each.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def _put(blob: bytes):
    """One safetensors blob into the object store, as an array a reader maps without a copy."""
    return ray.put(np.frombuffer(blob, dtype=np.uint8))


def _fetch_blobs(handle: WeightsHandle) -> dict[str, torch.Tensor]:
    """The published tensors as read-only views into the object store: load them (copy), never write them."""
    out: dict[str, torch.Tensor] = {}
    for blob in ray.get(list(handle.refs)):
        out.update(read_views(blob)[0])
    if len(out) != handle.n_tensors:
        raise RuntimeError(f"weights v{handle.policy_version}: got {len(out)} tensors, "
                           f"the handle lists {handle.n_tensors}")
    return out


@register("lora_delta")
class LoRASync:
    """The whole adapter as one object (it is small)."""

    name = "lora_delta"

    def publish(self, state: dict[str, torch.Tensor], policy_version: int, generation: int = 0) -> WeightsHandle:
        t0 = time.perf_counter()
        blob = st_save(_to_cpu(state), metadata={"policy_version": str(policy_version)})
        ref = _put(blob)
        return WeightsHandle(backend=self.name, policy_version=int(policy_version), generation=int(generation),
                             refs=(ref,), nbytes=len(blob), n_tensors=len(state),
                             publish_seconds=time.perf_counter() - t0)

    def fetch(self, handle: WeightsHandle) -> dict[str, torch.Tensor]:
        return _fetch_blobs(handle)


@register("full_state")
class BucketedSync:
    """The full trainable state in buckets of at most `bucket_mb` (a tensor larger than a bucket gets its own)."""

    name = "full_state"

    def __init__(self, bucket_mb: float = 256.0):
        if not bucket_mb > 0:
            raise ConfigError("runtime.weight_sync_bucket_mb", bucket_mb, "a value > 0")
        self.bucket_bytes = int(bucket_mb * 1024 * 1024)

    def buckets(self, state: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        out: list[dict[str, torch.Tensor]] = []
        cur: dict[str, torch.Tensor] = {}
        size = 0
        for k in sorted(state):
            t = state[k]
            n = t.numel() * t.element_size()
            if cur and size + n > self.bucket_bytes:
                out.append(cur)
                cur, size = {}, 0
            cur[k] = t
            size += n
        if cur:
            out.append(cur)
        return out

    def publish(self, state: dict[str, torch.Tensor], policy_version: int, generation: int = 0) -> WeightsHandle:
        t0 = time.perf_counter()
        refs, nbytes = [], 0
        for i, bucket in enumerate(self.buckets(state)):  # one bucket's copy at a time, not the model's
            blob = st_save(_to_cpu(bucket), metadata={"policy_version": str(policy_version), "bucket": str(i)})
            nbytes += len(blob)
            refs.append(_put(blob))
        return WeightsHandle(backend=self.name, policy_version=int(policy_version), generation=int(generation),
                             refs=tuple(refs), nbytes=nbytes, n_tensors=len(state),
                             publish_seconds=time.perf_counter() - t0)

    def fetch(self, handle: WeightsHandle) -> dict[str, torch.Tensor]:
        return _fetch_blobs(handle)


class WeightReceiver:
    """Rollout-side: remembers the (generation, version) it last applied; `apply(handle, load)` loads only a
    different one. Not "only newer": a learner resumed from a checkpoint starts a new generation whose version
    may be lower than what a worker holds, and the worker must go back to it."""

    def __init__(self) -> None:
        self.version = -1
        self.generation = -1

    def apply(self, handle: WeightsHandle | None, load: Callable[[dict[str, torch.Tensor]], None]) -> float:
        if handle is not None and handle.eval_only:
            raise ValueError(f"weights v{handle.policy_version} are eval-only (the EMA shadow): not for sampling")
        if handle is None or (handle.generation, handle.policy_version) == (self.generation, self.version):
            return 0.0
        t0 = time.perf_counter()
        load(build(handle.backend).fetch(handle))
        self.version = handle.policy_version
        self.generation = handle.generation
        return time.perf_counter() - t0

    def apply_once(self, handle: WeightsHandle, load: Callable[[dict[str, torch.Tensor]], None]) -> None:
        """Load `handle` (an eval's EMA shadow) for one call: the receiver forgets what it held, so the next
        `apply` reloads the weights its request names."""
        self.version = -1
        self.generation = -1
        load(build(handle.backend).fetch(handle))
