"""Weight sync: how the learner's trainable weights reach the rollout workers (a registry of backends).

- `lora_delta` (the default when the backbone trains a LoRA adapter): the adapter *is* the delta from the frozen base,
  a few MB, so it goes through the object store as one safetensors blob; a worker reads it in place
  (`flowbp_core.wire`), and the workers of a node share the node's one copy.
- `full_state` (full fine-tuning): the full trainable state (under FSDP gathered into rank 0's host memory alone)
  is cut into buckets of `runtime.weight_sync_bucket_mb` and streamed into a `WeightServer` actor on rank 0's node,
  which keeps the newest publishes in its own memory, never in the object store. A rollout worker reads the
  buckets one call each, at most `IN_FLIGHT` (2) at a time, copies each one's tensors and drops it,
  and loads the weights only once every bucket has arrived: no sample is drawn with half-updated weights. The
  server puts a bucket into the object store when a worker asks for it and hands the same object to the workers
  that ask while it is among the last `IN_FLIGHT` put (workers reading in step share it, and a node pulls it
  once), so the store pins at most `IN_FLIGHT` buckets for the publisher, `IN_FLIGHT` for the server and
  `IN_FLIGHT` for each reading worker, whatever the model size.
  The server keeps the publishes a request can still name (`versions_kept`) and frees older ones.
- `collective` (`collective_sync.py`, either fine-tuning mode): learner rank 0 broadcasts the state in buckets over
  torch.distributed (gloo on CPU, NCCL on GPUs) to the workers that ask for it together; no object store. A
  worker on rank 0's own device maps the buckets instead (CUDA IPC on a shared GPU, shared memory on the CPU).

Every publish carries a `policy_version` (the learner step count), and a worker applies a handle only when its
version is newer than what it holds: a restarted worker therefore catches up from the next request, which always
names the weights it must be sampled with. Publish and apply are timed; both feed `flowbp_weight_sync_seconds`.
Weights whose publisher died (a learner restart) raise `WeightsLost` in the worker; the driver then waits for the
new learner generation.
"""

from __future__ import annotations

import importlib
import time
from collections import deque
from typing import Callable, Protocol

import numpy as np
import ray
import torch
from safetensors.torch import save as st_save

from flowbp_core.errors import ConfigError
from flowbp_core.wire import read_views
from services.runtime.buckets import bucket_groups
from services.runtime.payloads import BucketStream, WeightsHandle
from services.runtime.placement import on_this_node


class WeightsLost(RuntimeError):
    """The weights a request names are gone: their publisher died (a learner restart) or freed them."""


class WeightSync(Protocol):
    name: str

    def publish(self, state: dict[str, torch.Tensor], policy_version: int, generation: int) -> WeightsHandle: ...

    def fetch(self, handle: WeightsHandle) -> dict[str, torch.Tensor]: ...


_REGISTRY: dict[str, Callable[..., WeightSync]] = {}
# Backends in their own module, imported when named (each registers itself).
_BUILTIN_MODULES = {"collective": "services.runtime.collective_sync"}


def complete(out: dict[str, torch.Tensor], handle: WeightsHandle) -> dict[str, torch.Tensor]:
    """`out` when it holds every tensor the handle lists (a short read is a bug, never a partial load)."""
    if len(out) != handle.n_tensors:
        raise RuntimeError(f"weights v{handle.policy_version}: got {len(out)} tensors, "
                           f"the handle lists {handle.n_tensors}")
    return out


def register(name: str):
    def deco(factory):
        _REGISTRY[name] = factory
        return factory

    return deco


def names() -> list[str]:
    for module in _BUILTIN_MODULES.values():
        importlib.import_module(module)
    return sorted(_REGISTRY)


def build(name: str, **kw) -> WeightSync:
    if name in _BUILTIN_MODULES:
        importlib.import_module(_BUILTIN_MODULES[name])
    if name not in _REGISTRY:
        raise ConfigError("runtime.weight_sync", name, f"one of {names()}")
    return _REGISTRY[name](**kw)


def for_run(cfg) -> WeightSync:
    """The publishing side of the run's backend (learner rank 0), with the run's bucket size and kept versions."""
    rt = cfg.runtime
    name = backend_name(rt.weight_sync, cfg.backbone.finetune)
    kw = {"bucket_mb": rt.weight_sync_bucket_mb, "keep": versions_kept(cfg)}
    if name == "collective":
        return build(name, **kw, backend="nccl" if rt.use_gpu else "gloo", timeout_s=rt.hello_timeout_s,
                     same_device=rt.weight_sync_same_device)
    return build(name, **kw) if name == "full_state" else build(name)


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
    return complete(out, handle)


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


IN_FLIGHT = 2  # buckets the publisher, the server and each rollout worker may hold in the object store at once


def versions_kept(cfg) -> int:
    """The publishes a `WeightServer` keeps: those a rollout or eval request may still name. In sync mode only the
    newest (the learner publishes again only after the rollouts sampled with it finished); in async mode requests
    in flight may lag by up to queue_depth + max_staleness publishes; one more for an eval's EMA shadow."""
    rt = cfg.runtime
    live = 1 if rt.mode == "sync" else 1 + rt.queue_depth + rt.max_staleness
    return live + (1 if cfg.train.ema_decay is not None else 0)


@ray.remote(num_cpus=0, max_concurrency=4)
class WeightServer:
    """Holds the newest `keep` full_state publishes in its own memory (numpy buckets) and returns one bucket a
    call, so weights enter the object store only while a reader fetches them."""

    def __init__(self, keep: int, shared: int = 2) -> None:
        import threading

        self.keep = keep
        self.shared = shared
        self.cache: dict[tuple[int, int], object] = {}  # the last `shared` buckets put, in put order
        self.lock = threading.Lock()
        self.filling: dict[int, dict[int, np.ndarray]] = {}  # calls run on several threads: any order
        self.ready: dict[int, list[np.ndarray]] = {}  # in publish order

    def add(self, key: int, index: int, blob: np.ndarray) -> None:
        # A copy out of the object store: the caller's ref is dropped once this call returns.
        self.filling.setdefault(key, {})[index] = np.array(blob)

    def commit(self, key: int, n_buckets: int) -> None:
        got = self.filling.pop(key, {})
        if sorted(got) != list(range(n_buckets)):
            raise ValueError(f"publish {key}: buckets {sorted(got)} arrived, expected 0..{n_buckets - 1}")
        with self.lock:
            self.ready[key] = [got[i] for i in range(n_buckets)]
            for old in list(self.ready)[:-self.keep]:
                del self.ready[old]
            self.cache = {k: r for k, r in self.cache.items() if k[0] in self.ready}

    def bucket(self, key: int, index: int) -> list:
        """[the bucket's ObjectRef]: workers that ask for it while it is among the last `shared` put get the same
        object, so a node's workers reading in step pull one copy; the server drops its ref when the bucket leaves
        that window, and the object is freed once its readers drop theirs."""
        with self.lock:
            if key not in self.ready:
                raise KeyError(f"publish {key} is not held (held: {sorted(self.ready)}; the server keeps "
                               f"{self.keep})")
            ref = self.cache.get((key, index))
            if ref is None:
                ref = self.cache[(key, index)] = ray.put(self.ready[key][index])
                for old in list(self.cache)[:-self.shared]:
                    del self.cache[old]
            return [ref]

    def held(self) -> list[int]:
        return sorted(self.ready)


@register("full_state")
class BucketedSync:
    """The full trainable state in buckets of at most `bucket_mb` (a tensor larger than a bucket gets its own),
    streamed through a `WeightServer` with at most `IN_FLIGHT` buckets in the object store."""

    name = "full_state"

    def __init__(self, bucket_mb: float = 64.0, in_flight: int = IN_FLIGHT, keep: int = 1):
        if not bucket_mb > 0:
            raise ConfigError("runtime.weight_sync_bucket_mb", bucket_mb, "a value > 0")
        if in_flight < 1:
            raise ValueError(f"in_flight={in_flight}: at least one bucket must be in flight")
        self.bucket_bytes = int(bucket_mb * 1024 * 1024)
        self.in_flight = int(in_flight)
        self.keep = int(keep)
        self.server = None  # started on the first publish, on this node; it dies with this process
        self.next_key = 0

    def buckets(self, state: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        return bucket_groups(state, self.bucket_bytes)

    def publish(self, state: dict[str, torch.Tensor], policy_version: int, generation: int = 0) -> WeightsHandle:
        t0 = time.perf_counter()
        if self.server is None:
            self.server = WeightServer.options(scheduling_strategy=on_this_node()).remote(self.keep, self.in_flight)
        key, self.next_key = self.next_key, self.next_key + 1
        pending: deque = deque()
        nbytes = n = 0
        for n, bucket in enumerate(self.buckets(state), start=1):  # one bucket's copy at a time, not the model's
            blob = st_save(_to_cpu(bucket), metadata={"policy_version": str(policy_version), "bucket": str(n - 1)})
            nbytes += len(blob)
            if len(pending) >= self.in_flight:
                ray.get(pending.popleft())  # the server copied that bucket: its object is freed
            pending.append(self.server.add.remote(key, n - 1, np.frombuffer(blob, dtype=np.uint8)))
            del blob
        ray.get(list(pending))
        ray.get(self.server.commit.remote(key, n))
        stream = BucketStream(server=self.server, key=key, n_buckets=n, in_flight=self.in_flight)
        return WeightsHandle(backend=self.name, policy_version=int(policy_version), generation=int(generation),
                             refs=(), nbytes=nbytes, n_tensors=len(state),
                             publish_seconds=time.perf_counter() - t0, stream=stream)

    def fetch(self, handle: WeightsHandle) -> dict[str, torch.Tensor]:
        """Every bucket, read in order with at most the stream's `in_flight` in the object store, copied out."""
        if handle.stream is None:
            return _fetch_blobs(handle)
        s = handle.stream
        out: dict[str, torch.Tensor] = {}
        refs: deque = deque()
        nxt = 0
        try:
            while nxt < s.n_buckets or refs:
                while nxt < s.n_buckets and len(refs) < s.in_flight:
                    refs.append(s.server.bucket.remote(s.key, nxt))
                    nxt += 1
                ref = ray.get(refs.popleft())[0]
                out.update({k: v.clone() for k, v in read_views(ray.get(ref))[0].items()})
                del ref  # drops this reader's hold on the bucket before the next one is asked for
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError, ray.exceptions.ObjectLostError) as e:
            raise WeightsLost(f"weights v{handle.policy_version} (generation {handle.generation}): "
                              f"{type(e).__name__}: {e}") from e
        return complete(out, handle)


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
        state = build(handle.backend).fetch(handle)  # every bucket first: the weights change in one load
        self.version = self.generation = -1  # a load that fails part-way leaves weights no request names
        load(state)
        self.version = handle.policy_version
        self.generation = handle.generation
        return time.perf_counter() - t0

    def apply_once(self, handle: WeightsHandle, load: Callable[[dict[str, torch.Tensor]], None]) -> None:
        """Load `handle` (an eval's EMA shadow) for one call: the receiver forgets what it held, so the next
        `apply` reloads the weights its request names."""
        self.version = -1
        self.generation = -1
        load(build(handle.backend).fetch(handle))
