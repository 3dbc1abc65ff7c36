"""`runtime.weight_sync: collective` (issue 16, item 2): learner rank 0 holds each publish as byte buckets and
broadcasts them over gloo to the readers that ask together, while a reader on its own device maps them (shared
memory here, CUDA IPC on a GPU); a run on the real Ray runtime syncs through either, and a rollout worker killed
between two syncs comes back, reads the weights its retried request names, and the run equals the uninterrupted
one."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from tests.tiny_runs import tiny_cfg
from tests.waiting import wait_for

REPO = Path(__file__).resolve().parents[2]


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"a.w": torch.randn(3, 5, generator=g), "b.w": torch.randn(7, generator=g).to(torch.bfloat16),
            "c.scale": torch.tensor(2.5), "d.idx": torch.arange(6, dtype=torch.int64).view(2, 3)}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def test_pack_cuts_buckets_and_unpack_restores_every_tensor_bitwise():
    from services.runtime.collective_sync import bucket_nbytes, pack, unpack

    state = _state()
    layout, buffers = pack(state, 64, torch.device("cpu"))  # 64-byte buckets, tensors in name order
    assert [[name for name, _, _ in b] for b in layout] == [["a.w"], ["b.w", "c.scale"], ["d.idx"]]
    assert [buf.numel() for buf in buffers] == [bucket_nbytes(b) for b in layout] == [60, 14 + 4, 48]
    back = {}
    for buf, bucket in zip(buffers, layout):
        back.update(unpack(buf, bucket))
    assert _same(back, state)


def _read_in_thread(stream, box: dict, name: str) -> threading.Thread:
    from services.runtime.collective_sync import read

    def run():
        try:
            box[name] = read(stream, torch.device("cpu"))
        except Exception as e:  # noqa: BLE001 - the test asserts on what the reader got
            box[name] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_readers_that_ask_together_share_one_broadcast_and_a_late_one_gets_its_own():
    from services.runtime.collective_sync import Sender, pack
    from services.runtime.payloads import CollectiveStream
    from services.runtime.weight_sync import WeightsLost

    state = _state()
    sender = Sender(keep=1, backend="gloo", timeout_s=60, host="127.0.0.1", start=False)
    layout, buffers = pack(state, 64, torch.device("cpu"))
    sender.hold(0, buffers)
    stream = CollectiveStream(host=sender.host, port=sender.port, key=0, backend="gloo", buckets=layout,
                              timeout_s=60)
    box: dict = {}
    readers = [_read_in_thread(stream, box, f"r{i}") for i in range(2)]
    wait_for(lambda: sender.store.check(["ticket/0", "ticket/1"]), 60, "two readers' tickets")
    sender.thread.start()  # both tickets are queued: one group of rank 0 + 2 readers
    for t in readers:
        t.join(60)
    assert _same(box["r0"], state) and _same(box["r1"], state)
    _read_in_thread(stream, box, "late").join(60)
    assert _same(box["late"], state)
    assert sender.group_sizes == [2, 1]

    sender.hold(1, buffers)  # keep=1: publish 0 is dropped
    _read_in_thread(stream, box, "old").join(60)
    assert isinstance(box["old"], WeightsLost) and "no longer held" in str(box["old"])
    sender.close()
    assert not sender.thread.is_alive()


_READER = ("import pickle, sys, torch\n"
           "from services.runtime.collective_sync import CollectiveSync\n"
           "handle = pickle.loads(sys.stdin.buffer.read())\n"
           "torch.save(CollectiveSync().fetch(handle), sys.argv[1])\n")


def _read_in_process(handle, out: Path) -> subprocess.CompletedProcess:
    import pickle

    return subprocess.run([sys.executable, "-c", _READER, str(out)], input=pickle.dumps(handle), capture_output=True,
                          timeout=120, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_a_reader_on_the_publishers_device_maps_the_buckets_without_a_broadcast(tmp_path):
    """A reader process on the publisher's device (here: the CPU of one host, by memfds; on a GPU, CUDA IPC) takes
    no ticket and joins no broadcast; one on another device broadcasts; a dropped publish is refused and its memfd
    is gone, and a closed sender holds none."""
    import dataclasses

    from services.runtime.collective_sync import CollectiveSync

    state = _state()
    sync = CollectiveSync(bucket_mb=64 / 2**20, keep=1, backend="gloo", timeout_s=60)
    handle = sync.publish(state, 1)
    assert handle.stream.shared is not None and len(handle.stream.shared) == len(handle.stream.buckets) > 1
    got = _read_in_process(handle, tmp_path / "mapped.pt")
    assert got.returncode == 0, got.stderr.decode()[-2000:]
    assert _same(torch.load(tmp_path / "mapped.pt"), state)
    assert sync.sender.store.add("tickets", 0) == 0 and sync.sender.group_sizes == []

    elsewhere = dataclasses.replace(handle, stream=dataclasses.replace(handle.stream, shared_on="another-node/cpu"))
    got = _read_in_process(elsewhere, tmp_path / "broadcast.pt")
    assert got.returncode == 0, got.stderr.decode()[-2000:]
    assert _same(torch.load(tmp_path / "broadcast.pt"), state) and sync.sender.group_sizes == [1]

    sync.publish(state, 2)  # keep=1: publish 0 is dropped
    got = _read_in_process(handle, tmp_path / "old.pt")
    assert got.returncode != 0 and b"WeightsLost: publish 0 is no longer held" in got.stderr
    gone = subprocess.run([sys.executable, "-c", "import pickle, sys, torch; pickle.loads(sys.stdin.buffer.read())"],
                          input=handle.stream.shared[0], capture_output=True, timeout=120)
    assert gone.returncode != 0 and b"FileNotFoundError" in gone.stderr, gone.stderr[-2000:]  # its memfd is gone
    assert _our_memfds()
    sync.sender.close()  # releases what it held
    assert not _our_memfds()


def _our_memfds() -> list[str]:
    from services.runtime import buckets

    fds = Path("/proc/self/fd")
    return [link for link in (os.readlink(f) for f in fds.iterdir() if f.exists()) if buckets.SHM_PREFIX in link]


def test_a_dead_publishers_buckets_are_gone_with_it():
    # memfds: the kernel frees them when their process dies, so a killed learner leaks nothing
    code = ("import os, sys, torch\n"
            "from services.runtime import buckets\n"
            "held, handles = buckets.share([torch.arange(8, dtype=torch.uint8)])\n"
            "sys.stdout.buffer.write(handles[0]); sys.stdout.flush()\n"
            "os.kill(os.getpid(), 9)\n")
    dead = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert dead.returncode == -9 and dead.stdout, dead.stderr[-2000:]
    import pickle

    with pytest.raises(FileNotFoundError):
        pickle.loads(dead.stdout)


def test_a_process_with_a_serving_sender_exits_cleanly():
    # a daemon thread whose c10d wait returns while the interpreter finalizes aborts it (exit 134): a module
    # global that sleeps in __del__ holds finalization open past the 1 s wait; exit must close the sender first
    code = ("import time\n"
            "from services.runtime.collective_sync import Sender\n"
            "class SlowTeardown:\n"
            "    def __del__(self):\n"
            "        time.sleep(3)\n"
            "s = Sender(keep=1, backend='gloo', timeout_s=1, host='127.0.0.1')\n"
            "keep = SlowTeardown()\n"
            "print('serving', s.thread.is_alive(), flush=True)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0 and "serving True" in out.stdout, (out.returncode, out.stdout, out.stderr[-2000:])


def test_a_publisher_that_is_gone_raises_weights_lost(monkeypatch):
    import socket

    from services.runtime import collective_sync
    from services.runtime.payloads import CollectiveStream
    from services.runtime.weight_sync import WeightsLost

    monkeypatch.setattr(collective_sync, "CONNECT_S", 1.0)
    with socket.socket() as s:  # a port nobody listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    stream = CollectiveStream(host="127.0.0.1", port=port, key=0, backend="gloo", buckets=(), timeout_s=5)
    with pytest.raises(WeightsLost, match="is gone"):
        collective_sync.read(stream, torch.device("cpu"))


@pytest.mark.integration
@pytest.mark.parametrize("same_device", [False, True], ids=["broadcast", "same_device"])
def test_ray_run_syncs_by_broadcast_and_a_restarted_worker_catches_up(ray_client, tmp_path, same_device):
    """Two rollout workers and one learner rank on Ray, weights by gloo broadcast (or, on one node's CPU, mapped
    from learner rank 0's shared memory). Rollout worker 0 is killed
    (Ray restarts it) once step 0 is done, between the syncs of v1 and v2: the run finishes, the restarted
    worker (a new process) sampled with the weights its requests named, and the losses equal the single-process
    loop's."""
    import ray

    from flowbp_core.run import train_loop
    from services.runtime.driver import Driver

    torch.set_num_threads(1)
    steps = 8  # the kill after step 0 lands while later steps still sample, even when a sync is fast
    cfg = tiny_cfg(tmp_path, "coll", train={"steps": steps},
                   reward={"terms": [{"name": "saturation"}], "loss": "neg_mean", "placement": "colocated"},
                   runtime={"weight_sync": "collective", "weight_sync_bucket_mb": 0.001,
                            "weight_sync_same_device": same_device},
                   eval={"every": 0, "limit": 0})
    drv = Driver(cfg)
    box: dict = {}
    run = threading.Thread(target=lambda: box.setdefault("summary", drv.run()), daemon=True)
    run.start()
    wait_for(lambda: 0 in drv.outcomes, 900, "step 0", interval=0.02)
    pid = ray.get(drv.workers[0].pid.remote())
    ray.kill(drv.workers[0], no_restart=False)
    run.join(timeout=900)
    assert not run.is_alive(), "run did not finish"
    s = box["summary"]
    assert s.status == "finished", s.failure
    assert s.policy_version == steps and sorted(s.losses) == list(range(steps))
    h = drv.hello.weights  # the learner generation's first publish; the outcomes' handles are dropped once read
    assert h.backend == "collective" and len(h.stream.buckets) > 1
    assert (h.stream.shared is not None) == same_device
    pids = drv.record.counters.rollout_pids  # the processes that sampled each worker's shards
    assert pid in pids[0] and len(pids[0]) == 2 and len(pids[1]) == 1, pids
    ref = train_loop(cfg.model_copy(update={"run_id": "ref"}), run_dir=tmp_path / "ref")
    assert [r.loss for r in ref.results] == pytest.approx([s.losses[i] for i in range(steps)], rel=1e-5, abs=1e-7)


def test_the_run_config_builds_the_collective_backend_with_its_bucket_size_and_kept_versions(tmp_path):
    from services.runtime import weight_sync
    from services.runtime.collective_sync import CollectiveSync

    cfg = tiny_cfg(tmp_path, "c", runtime={"weight_sync": "collective", "weight_sync_bucket_mb": 0.5,
                                           "mode": "async", "max_staleness": 1, "queue_depth": 3})
    sync = weight_sync.for_run(cfg)
    assert isinstance(sync, CollectiveSync) and sync.backend == "gloo" and sync.sender is None and sync.same_device
    assert (sync.bucket_bytes, sync.keep, sync.timeout_s) == (512 * 1024, 5, cfg.runtime.hello_timeout_s)
    assert "collective" in weight_sync.names()
