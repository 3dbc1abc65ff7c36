"""Weights as byte buckets, the unit both `full_state` and `collective` move: a state cut into buckets
(`bucket_groups`), each bucket packed into one contiguous uint8 buffer and cut back into tensors (`pack`,
`unpack`), and buffers shared with another process of the same device (`share`: CUDA IPC handles on a GPU,
shared-memory file names on the CPU; `pickle.loads` of a handle maps the buffer).

No Ray here: `benchmarks/gpu_rollout.py` times the same-GPU handoff with these functions on a machine without Ray.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import shutil
from multiprocessing.reduction import ForkingPickler

import torch
import torch.multiprocessing as torch_mp

log = logging.getLogger(__name__)


def bucket_groups(state: dict[str, torch.Tensor], bucket_bytes: int) -> list[dict[str, torch.Tensor]]:
    """`state` in name order, cut into buckets of at most `bucket_bytes` (a larger tensor gets its own)."""
    out: list[dict[str, torch.Tensor]] = []
    cur: dict[str, torch.Tensor] = {}
    size = 0
    for k in sorted(state):
        t = state[k]
        n = t.numel() * t.element_size()
        if cur and size + n > bucket_bytes:
            out.append(cur)
            cur, size = {}, 0
        cur[k] = t
        size += n
    if cur:
        out.append(cur)
    return out


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.removeprefix("torch."))


def pack(state: dict[str, torch.Tensor], bucket_bytes: int, device: torch.device
         ) -> tuple[tuple[tuple[tuple[str, str, tuple[int, ...]], ...], ...], list[torch.Tensor]]:
    """(layout, buffers): each bucket's tensors as one contiguous uint8 buffer on `device`, and per bucket the
    (name, dtype, shape) of its tensors in order."""
    layout, buffers = [], []
    for group in bucket_groups(state, bucket_bytes):
        layout.append(tuple((k, str(t.dtype), tuple(t.shape)) for k, t in group.items()))
        buffers.append(torch.cat([t.detach().to(device).contiguous().reshape(-1).view(torch.uint8)
                                  for t in group.values()]))
    return tuple(layout), buffers


def bucket_nbytes(bucket: tuple[tuple[str, str, tuple[int, ...]], ...]) -> int:
    return sum(_dtype(d).itemsize * _numel(s) for _, d, s in bucket)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def unpack(buffer: torch.Tensor, bucket: tuple[tuple[str, str, tuple[int, ...]], ...]) -> dict[str, torch.Tensor]:
    out, at = {}, 0
    for name, d, shape in bucket:
        n = _dtype(d).itemsize * _numel(shape)
        # a clone gives each tensor its own aligned storage before the dtype view
        out[name] = buffer[at:at + n].clone().view(_dtype(d)).reshape(shape)
        at += n
    return out


@contextlib.contextmanager
def _file_system_sharing():
    # CPU tensors pickle as a shared-memory file's name (not a file descriptor, which only a multiprocessing
    # child can receive), so any process on the node can map them.
    before = torch_mp.get_sharing_strategy()
    torch_mp.set_sharing_strategy("file_system")
    try:
        yield
    finally:
        torch_mp.set_sharing_strategy(before)


def _shm_free() -> int:
    try:
        return shutil.disk_usage("/dev/shm").free
    except OSError:
        return 0


def share(buffers: list[torch.Tensor]) -> tuple[bytes, ...] | None:
    """Each buffer pickled by torch.multiprocessing (CUDA IPC handles; CPU: moved into shared memory), valid while
    the caller holds the buffers; None where torch cannot share them (e.g. a /dev/shm too small)."""
    host = sum(b.numel() for b in buffers if not b.is_cuda)
    if host and _shm_free() < 2 * host:
        # a write past a full /dev/shm is a SIGBUS, not an exception (a pod's default /dev/shm is 64 MiB)
        log.warning("weight sync: %.0f MiB of buckets, /dev/shm has %.0f MiB free: not shared", host / 2**20,
                    _shm_free() / 2**20)
        return None
    try:
        with _file_system_sharing():
            out = tuple(bytes(ForkingPickler.dumps(b)) for b in buffers)
    except (RuntimeError, OSError) as e:
        log.warning("weight sync: buffers not shareable: %s", e)
        return None
    for b in buffers:
        if not b.is_cuda:
            # pickling adds a reference for the handle in transit; drop it, so the file lives as long as the buffer
            b.untyped_storage()._shared_decref()
    return out


def mapped(blobs: tuple[bytes, ...], layout: tuple[tuple[tuple[str, str, tuple[int, ...]], ...], ...]
           ) -> dict[str, torch.Tensor]:
    """The tensors of buffers another process shared (`share`'s handles, `pack`'s layout): each buffer mapped
    (no copy), its tensors copied out into this process's own memory on the same device."""
    out: dict[str, torch.Tensor] = {}
    for blob, bucket in zip(blobs, layout):
        out.update(unpack(pickle.loads(blob), bucket))
    if any(t.is_cuda for t in out.values()):
        torch.cuda.synchronize()  # the copies are done before the caller checks the buffers were still held
    return out
