"""Weights as byte buckets, the unit both `full_state` and `collective` move: a state cut into buckets
(`bucket_groups`), each bucket packed into one contiguous uint8 buffer and cut back into tensors (`pack`,
`unpack`), and buffers shared with another process of the same device (`share`: CUDA IPC handles on a GPU,
memfds opened through /proc on the CPU; `pickle.loads` of a handle maps the buffer, `mapped` copies the tensors out).

No Ray here: `benchmarks/gpu_rollout.py` times the same-GPU handoff with these functions on a machine without Ray.
"""

from __future__ import annotations

import logging
import mmap
import os
import pickle
import uuid
import weakref
from multiprocessing.reduction import ForkingPickler

import torch

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


SHM_PREFIX = "flowbp-wsync"  # the name of each shared bucket's memfd: flowbp-wsync-<random>


def _map_fd(pid: int, fd: int, name: str, nbytes: int) -> torch.Tensor:
    """A reader's view of a bucket that process `pid` shared as memfd `fd` (a copy-on-write mapping: reads share
    the publisher's pages). FileNotFoundError once the publisher closed it or died."""
    path = f"/proc/{pid}/fd/{fd}"
    if os.readlink(path) != f"/memfd:{name} (deleted)":  # the fd number now names another file
        raise FileNotFoundError(f"{path} no longer holds {name}: the publish was dropped")
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), nbytes, access=mmap.ACCESS_COPY)
    return torch.frombuffer(m, dtype=torch.uint8)


class _FdHandle:
    """Pickles as a call to `_map_fd`, so `pickle.loads` of a CPU handle maps the bucket as that of a CUDA IPC
    handle does."""

    def __init__(self, pid: int, fd: int, name: str, nbytes: int):
        self.args = (pid, fd, name, nbytes)

    def __reduce__(self):
        return _map_fd, self.args


def _memfd_backed(buffer: torch.Tensor) -> tuple[torch.Tensor, bytes]:
    """`buffer`'s bytes in an anonymous shared-memory file (memfd: freed by the kernel when this process closes it
    or dies, and not bounded by /dev/shm's size), as a tensor mapping it, and the handle a reader maps it by."""
    name = f"{SHM_PREFIX}-{uuid.uuid4().hex}"
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, buffer.numel())
        backed = torch.frombuffer(mmap.mmap(fd, buffer.numel()), dtype=torch.uint8)
    except (OSError, ValueError):
        os.close(fd)
        raise
    backed.copy_(buffer)
    weakref.finalize(backed, os.close, fd)  # the held buffer's lifetime is the bucket's
    return backed, pickle.dumps(_FdHandle(os.getpid(), fd, name, buffer.numel()))


def share(buffers: list[torch.Tensor]) -> tuple[list[torch.Tensor], tuple[bytes, ...] | None]:
    """(the buffers to hold, a handle for each): on a GPU the same buffers and their CUDA IPC handles
    (torch.multiprocessing's pickling); on the CPU the buffers moved into memfds that live as long as the returned
    tensors (a reader on the host opens them through /proc). The handles are valid while the caller holds those
    buffers. None for the handles where they cannot be made, with the buffers unchanged."""
    try:
        if all(b.is_cuda for b in buffers):
            return buffers, tuple(bytes(ForkingPickler.dumps(b)) for b in buffers)
        backed = [_memfd_backed(b.cpu()) for b in buffers]
    except (RuntimeError, OSError, ValueError) as e:
        log.warning("weight sync: buffers not shareable: %s", e)
        return buffers, None
    return [t for t, _ in backed], tuple(h for _, h in backed)


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
