"""Weights as byte buckets, the unit both `full_state` and `collective` move: a state cut into buckets
(`bucket_groups`), each bucket packed into one contiguous uint8 buffer and cut back into tensors (`pack`,
`unpack`), and buffers shared with another process of the same device (`share`: CUDA IPC handles on a GPU,
files under /dev/shm on the CPU; `pickle.loads` of a handle maps the buffer, `mapped` copies the tensors out).

No Ray here: `benchmarks/gpu_rollout.py` times the same-GPU handoff with these functions on a machine without Ray.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import mmap
import os
import pickle
import shutil
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


SHM_DIR = "/dev/shm"
SHM_PREFIX = "flowbp-wsync"  # files are <prefix>-<publisher pid>-<random>: a dead publisher's are swept


def _shm_free() -> int:
    try:
        return shutil.disk_usage(SHM_DIR).free
    except OSError:
        return 0


def _map_file(path: str, nbytes: int) -> torch.Tensor:
    """A reader's view of a shared bucket file (copy-on-write mapping: reads share the publisher's pages)."""
    with open(path, "rb") as f:  # FileNotFoundError once the publisher dropped it
        m = mmap.mmap(f.fileno(), nbytes, access=mmap.ACCESS_COPY)
    return torch.frombuffer(m, dtype=torch.uint8)


class _FileHandle:
    """Pickles as a call to `_map_file`, so `pickle.loads` of a CPU handle maps the file as CUDA's maps the IPC
    handle."""

    def __init__(self, path: str, nbytes: int):
        self.path, self.nbytes = path, nbytes

    def __reduce__(self):
        return _map_file, (self.path, self.nbytes)


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _sweep_dead_publishers() -> None:
    for path in glob.glob(os.path.join(SHM_DIR, f"{SHM_PREFIX}-*-*")):
        pid = os.path.basename(path).split("-")[2]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            _unlink(path)
        except PermissionError:  # alive, another user's
            pass


def _file_backed(buffer: torch.Tensor) -> tuple[torch.Tensor, bytes]:
    """`buffer`'s bytes in a file under /dev/shm, as a tensor mapping that file (the file is removed when the
    tensor is freed, or at exit), and the handle a reader maps it by."""
    path = os.path.join(SHM_DIR, f"{SHM_PREFIX}-{os.getpid()}-{uuid.uuid4().hex}")
    buffer.numpy().tofile(path)
    backed = torch.from_file(path, shared=True, size=buffer.numel(), dtype=torch.uint8)
    weakref.finalize(backed, _unlink, path)
    return backed, pickle.dumps(_FileHandle(path, buffer.numel()))


def share(buffers: list[torch.Tensor]) -> tuple[list[torch.Tensor], tuple[bytes, ...] | None]:
    """(the buffers to hold, a handle for each): on a GPU the same buffers and their CUDA IPC handles
    (torch.multiprocessing's pickling); on the CPU the buffers moved into files under /dev/shm, which live as
    long as the returned tensors. The handles are valid while the caller holds those buffers. None for the
    handles where they cannot be shared (no CUDA IPC, or a /dev/shm too small), with the buffers unchanged."""
    try:
        if all(b.is_cuda for b in buffers):
            return buffers, tuple(bytes(ForkingPickler.dumps(b)) for b in buffers)
        need = sum(b.numel() for b in buffers)
        if _shm_free() < 2 * need:
            # a write past a full /dev/shm is a SIGBUS, not an exception (a pod's default /dev/shm is 64 MiB)
            log.warning("weight sync: %.0f MiB of buckets, %s has %.0f MiB free: not shared", need / 2**20,
                        SHM_DIR, _shm_free() / 2**20)
            return buffers, None
        _sweep_dead_publishers()
        backed = [_file_backed(b.cpu()) for b in buffers]
    except (RuntimeError, OSError) as e:
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
