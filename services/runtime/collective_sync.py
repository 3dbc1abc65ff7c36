"""`runtime.weight_sync: collective`: the trainable state goes from learner rank 0 to the rollout workers by
torch.distributed broadcasts (gloo on CPU, NCCL on GPUs), in buckets of `runtime.weight_sync_bucket_mb`, never
through the object store.

How it works: rank 0's `Sender` packs each publish into byte buckets (one copy, kept for the `versions_kept`
newest publishes) and serves a `TCPStore` on its node. A rollout worker that must load a publish (its request
names it, as with every backend) takes a ticket in that store and names the publish; the sender's thread takes
the queued tickets in order, puts the run of consecutive tickets for the same publish into one group (rank 0
plus those readers, a fresh store prefix each), and broadcasts the buckets to it. Workers whose requests arrive
together (a step's shards) are served by one broadcast; a worker that comes later (a restarted one catching up,
a retried request) gets its own.

A reader on rank 0's own device (rollout and learner sharing a GPU through fractional `num_gpus`, or both on
one host's CPU) joins no group: each publish also carries a handle for each bucket (`buckets.share`: a CUDA IPC
handle on a GPU; on the CPU, a memfd the reader opens through /proc), and that reader maps them and copies
the tensors out, with no host copy and no broadcast (`runtime.weight_sync_same_device`, on by default). Rank 0's
store says which publishes are held; a reader checks it before mapping and again after copying, so a publish
dropped meanwhile is never loaded half-overwritten. Where a handle cannot be mapped (another host, GPU or pid
namespace) the reader broadcasts as any other.

Why groups are formed per read, not once: a fixed group of rank 0 and every worker breaks when one dies (each
collective needs every member) and cannot take in a restarted worker without all members re-forming it. Here a
dead reader fails only its own group: the others of that group retry with a new ticket, the restarted worker
asks for the weights its next request names, and versions and generations behave as with the other backends
(a publish no longer held, or a publisher gone with its learner generation, raises `WeightsLost`).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import logging
import socket
import threading
import time
import weakref
from collections import OrderedDict

import torch
import torch.distributed as dist

from services.runtime.payloads import CollectiveStream, WeightsHandle
from services.runtime.buckets import bucket_nbytes, mapped, pack, share, unpack
from services.runtime.weight_sync import WeightsLost, complete, register

log = logging.getLogger(__name__)

READ_ATTEMPTS = 3  # a reader whose group failed (another reader died in it) asks again this often
CONNECT_S = 10.0  # a publisher's store that does not answer this fast died with its learner generation
WAIT_SLICE_S = 1.0  # the sender's thread waits for a ticket this long at a time, so that close() is heard


def make_group(store, rank: int, world: int, backend: str, timeout_s: float):
    """A process group of its own (not the default group: learner rank 0 is in its learner group already)."""
    timeout = datetime.timedelta(seconds=timeout_s)
    if backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, world, opts)
    return dist.ProcessGroupGloo(store, rank, world, timeout)


def broadcast(group, buffer: torch.Tensor) -> None:
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    group.broadcast([buffer], opts).wait()


def device_tag(device: torch.device) -> str:
    """"<host>:<boot id>/<GPU uuid or cpu>": processes with the same tag share a kernel and a GPU, so they can map
    each other's buffers (the host, not Ray's node id: two pods on one Ray node cannot see each other's)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            host = f"{socket.gethostname()}:{f.read().strip()}"
    except OSError:
        host = socket.gethostname()
    if device.type != "cuda":
        return f"{host}/cpu"
    return f"{host}/{torch.cuda.get_device_properties(device.index or torch.cuda.current_device()).uuid}"


def _connect(s: CollectiveStream):
    try:
        store = dist.TCPStore(s.host, s.port, is_master=False, timeout=datetime.timedelta(seconds=CONNECT_S))
    except RuntimeError as e:  # nobody serves it: the publisher's learner generation is gone
        raise WeightsLost(f"publish {s.key}: learner rank 0's store {s.host}:{s.port} is gone ({e})") from e
    store.set_timeout(datetime.timedelta(seconds=s.timeout_s))
    return store


def _not_held(s: CollectiveStream) -> WeightsLost:
    return WeightsLost(f"publish {s.key} is no longer held by learner rank 0 (it keeps the newest few)")


def read_shared(s: CollectiveStream, device: torch.device) -> dict[str, torch.Tensor] | None:
    """The publish mapped from rank 0's buffers and copied out, when this process is on their device; None when
    it is not or torch cannot map them (the caller broadcasts instead)."""
    if s.shared is None or s.shared_on != device_tag(device):
        return None
    store = _connect(s)
    if not store.check([f"held/{s.key}"]):
        raise _not_held(s)
    try:
        out = mapped(s.shared, s.buckets)
    except (RuntimeError, OSError, ValueError) as e:
        log.warning("collective weight sync: publish %d not mappable here, broadcasting: %s", s.key, e)
        return None
    if not store.check([f"held/{s.key}"]):  # dropped while copied: the buffers may have been reused
        raise _not_held(s)
    return out


def _node_ip() -> str:
    import ray

    return ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"


class Sender:
    """Rank 0's side: the publishes it holds, its store, and the thread that serves tickets with broadcasts."""

    def __init__(self, keep: int, backend: str, timeout_s: float, host: str | None = None, start: bool = True):
        self.keep, self.backend, self.timeout_s = int(keep), backend, float(timeout_s)
        self.host = host or _node_ip()
        timeout = datetime.timedelta(seconds=self.timeout_s)
        self.store = dist.TCPStore(self.host, 0, is_master=True, wait_for_workers=False, timeout=timeout)
        self.port = self.store.port
        self.held: OrderedDict[int, list[torch.Tensor]] = OrderedDict()
        self.lock = threading.Lock()
        self.group_sizes: list[int] = []  # readers served by each broadcast, in order
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, name="collective-sender", daemon=True)
        _LIVE.add(self)
        if start:
            self.thread.start()

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop serving and join the thread. A daemon thread still inside a c10d call when the interpreter
        finalizes aborts the process (its GIL release unwinds through noexcept C++), so exit closes every sender."""
        self.stopping.set()
        if self.thread.is_alive():
            self.thread.join(timeout_s)
        with self.lock:  # nothing is served any more: release the buffers (a CPU publish's memfds with them)
            for key in self.held:
                with contextlib.suppress(RuntimeError):  # unlisting is best effort once serving stopped
                    self.store.delete_key(f"held/{key}")
            self.held.clear()

    def hold(self, key: int, buffers: list[torch.Tensor]) -> None:
        """Keep publish `key`'s buffers (the newest `keep`); the store says which are held, and a dropped one is
        unlisted before its buffers are released, for readers that map them."""
        with self.lock:
            self.held[key] = buffers
            self.store.set(f"held/{key}", "1")
            while len(self.held) > self.keep:
                old = next(iter(self.held))
                self.store.delete_key(f"held/{old}")
                del self.held[old]

    def _serve(self) -> None:
        # its own client: the master store object is the publishing thread's
        store = dist.TCPStore(self.host, self.port, is_master=False,
                              timeout=datetime.timedelta(seconds=self.timeout_s))
        served, since = 0, time.monotonic()
        while not self.stopping.is_set():
            try:
                store.wait([f"ticket/{served}"], datetime.timedelta(seconds=WAIT_SLICE_S))
            except dist.DistStoreError:
                if time.monotonic() - since >= self.timeout_s:
                    if store.add("tickets", 0) > served + 1:
                        served += 1  # its reader took the ticket and died before naming a publish; later ones wait
                    since = time.monotonic()
                continue
            since = time.monotonic()
            try:
                tickets, key = self._queued(store, served)
            except (RuntimeError, ValueError) as e:  # a ticket that names no publish: skip it, serve the rest
                log.warning("collective weight sync: ticket %d unreadable: %s", served, e)
                served += 1
                continue
            served += len(tickets)
            self._serve_group(store, tickets, key)

    @staticmethod
    def _queued(store, first: int) -> tuple[list[int], int]:
        """Ticket `first` and the consecutive tickets after it already asking for the same publish."""
        key = int(store.get(f"ticket/{first}"))
        tickets, total = [first], store.add("tickets", 0)
        for t in range(first + 1, total):
            if not store.check([f"ticket/{t}"]) or int(store.get(f"ticket/{t}")) != key:
                break
            tickets.append(t)
        return tickets, key

    def _serve_group(self, store, tickets: list[int], key: int) -> None:
        with self.lock:
            buffers = self.held.get(key)
        prefix, world = f"group/{tickets[0]}/", len(tickets) + 1
        for rank, t in enumerate(tickets, start=1):
            store.set(f"assign/{t}", f"{prefix} {rank} {world} {int(buffers is not None)}")
        if buffers is None:
            return
        try:
            group = make_group(dist.PrefixStore(prefix, store), 0, world, self.backend, self.timeout_s)
            for buf in buffers:
                broadcast(group, buf)
            self.group_sizes.append(len(tickets))
        except RuntimeError as e:  # a reader died in the group: the others ask again
            log.warning("collective weight sync: broadcast of publish %d to tickets %s failed: %s", key, tickets, e)


_LIVE: weakref.WeakSet[Sender] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for sender in list(_LIVE):
        sender.close()


def read(s: CollectiveStream, device: torch.device) -> dict[str, torch.Tensor]:
    """One reader's copy of the publish `s` names: a ticket, then its group's broadcasts."""
    store = _connect(s)
    ticket = store.add("tickets", 1) - 1
    store.set(f"ticket/{ticket}", str(s.key))
    prefix, rank, world, held = store.get(f"assign/{ticket}").decode().split()
    if held != "1":
        raise _not_held(s)
    group = make_group(dist.PrefixStore(prefix, store), int(rank), int(world), s.backend, s.timeout_s)
    out: dict[str, torch.Tensor] = {}
    for bucket in s.buckets:
        buf = torch.empty(bucket_nbytes(bucket), dtype=torch.uint8, device=device)
        broadcast(group, buf)
        out.update(unpack(buf, bucket))
    return out


@register("collective")
class CollectiveSync:
    """Publish: pack into buckets and hold (rank 0); fetch: read through a broadcast group (rollout worker)."""

    name = "collective"

    def __init__(self, bucket_mb: float = 64.0, keep: int = 1, backend: str = "gloo", timeout_s: float = 600.0,
                 same_device: bool = True):
        self.bucket_bytes = int(bucket_mb * 1024 * 1024)
        self.keep, self.backend, self.timeout_s = int(keep), backend, float(timeout_s)
        self.same_device = bool(same_device)
        self.device = torch.device("cuda" if backend == "nccl" else "cpu")
        self.sender: Sender | None = None  # started on the first publish, in the publishing process
        self.next_key = 0

    def publish(self, state: dict[str, torch.Tensor], policy_version: int, generation: int = 0) -> WeightsHandle:
        t0 = time.perf_counter()
        if self.sender is None:
            self.sender = Sender(self.keep, self.backend, self.timeout_s)
        key, self.next_key = self.next_key, self.next_key + 1
        layout, buffers = pack(state, self.bucket_bytes, self.device)
        buffers, shared = share(buffers) if self.same_device else (buffers, None)
        self.sender.hold(key, buffers)
        stream = CollectiveStream(host=self.sender.host, port=self.sender.port, key=key, backend=self.backend,
                                  buckets=layout, timeout_s=self.timeout_s, shared=shared,
                                  shared_on=device_tag(self.device) if shared else "")
        return WeightsHandle(backend=self.name, policy_version=int(policy_version), generation=int(generation),
                             refs=(), nbytes=sum(b.numel() for b in buffers), n_tensors=len(state),
                             publish_seconds=time.perf_counter() - t0, stream=stream)

    def fetch(self, handle: WeightsHandle) -> dict[str, torch.Tensor]:
        s = handle.stream
        if not isinstance(s, CollectiveStream):
            raise ValueError(f"weights v{handle.policy_version}: a collective handle names no CollectiveStream")
        device = torch.device("cuda" if s.backend == "nccl" else "cpu")
        out = read_shared(s, device)
        return complete(out if out is not None else _read_retrying(handle, device), handle)


def _read_retrying(handle: WeightsHandle, device: torch.device) -> dict[str, torch.Tensor]:
    """`read` again when its group failed (another reader died in it), at most READ_ATTEMPTS times."""
    s = handle.stream
    for attempt in range(1, READ_ATTEMPTS + 1):
        try:
            return read(s, device)
        except WeightsLost:
            raise
        except RuntimeError as e:  # DistError and gloo's errors: a peer died or the publisher is gone
            if attempt == READ_ATTEMPTS:
                raise WeightsLost(f"weights v{handle.policy_version} (generation {handle.generation}) from "
                                  f"{s.host}:{s.port}: {type(e).__name__}: {e}") from e
    raise AssertionError("unreachable")
