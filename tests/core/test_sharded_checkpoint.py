"""`sharded` checkpoints (torch distributed checkpoint) from two FSDP ranks (gloo, spawned here without Ray) on a
two-layer model: every rank writes its own shards, one process reads them back whole (weights, EMA, optimizer
state) without a process group, and a rank that fails while writing its shards leaves no checkpoint that resume
would pick (every rank raises; the temporary folder is removed)."""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from services.localproc import free_port

pytestmark = pytest.mark.integration


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))


def _one_step(model, optimizer) -> None:
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    model(x).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _state(step, model, optimizer, ema):
    from flowbp_core.checkpoint import ShardedState

    return ShardedState(step=step, policy_version=step, module=model, optimizer=optimizer, ema_shadow=ema,
                        config={"run_id": "r"}, metrics={"loss": 0.5}, torch_rng=torch.get_rng_state())


def _rank_main(rank: int, port: int, run_dir: str, out: str) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.fsdp import fully_shard

    from flowbp_core.checkpoint import save_sharded_checkpoint

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    try:
        model = _model()
        for layer in model:
            fully_shard(layer)
        fully_shard(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        _one_step(model, optimizer)
        ema = [p.detach().float().clone() * 0.5 for p in model.parameters()]
        path = save_sharded_checkpoint(run_dir, _state(1, model, optimizer, ema))
        full = {n: p.full_tensor() for n, p in model.named_parameters()}
        avg = {n: optimizer.state[p]["exp_avg"].full_tensor() for n, p in model.named_parameters()}
        ema_full = {f"ema.{i}": t.full_tensor() for i, t in enumerate(ema)}
        _one_step(model, optimizer)
        if rank == 1:  # this rank fails while writing its shards of step 2
            def fail(*_a, **_k):
                raise OSError("disk full on rank 1")

            dcp.FileSystemWriter.write_data = fail
        raised = None
        try:
            save_sharded_checkpoint(run_dir, _state(2, model, optimizer, ema))
        except BaseException as e:  # noqa: BLE001 - DCP raises CheckpointException (a BaseException)
            raised = type(e).__name__
        if rank == 0:
            torch.save({"full": full, "avg": avg, "ema": ema_full}, Path(out, "expected.pt"))
        Path(out, f"rank{rank}.json").write_text(json.dumps({"path": None if path is None else str(path),
                                                             "raised": raised}))
    finally:
        dist.destroy_process_group()


def test_two_ranks_write_shards_one_process_reads_them_and_a_failed_rank_leaves_nothing(tmp_path):
    from flowbp_core import checkpoint as ckpt

    run_dir, out = tmp_path / "run", tmp_path / "out"
    out.mkdir()
    mp.spawn(_rank_main, args=(free_port(), str(run_dir), str(out)), nprocs=2, join=True)
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["path"] == str(run_dir / "step_1") and r1["path"] is None
    assert r0["raised"] and r1["raised"]  # both ranks learn of rank 1's failure: nobody waits forever
    # The failed step_2 left nothing: resume picks step_1, and no temporary folder remains.
    assert [c.step for c in ckpt.list_complete(run_dir)] == [1]
    assert sorted(p.name for p in run_dir.iterdir()) == ["step_1"]
    last = ckpt.latest_complete(run_dir)
    assert ckpt.layout(last) == ckpt.SHARDED
    assert sorted(p.name for p in (last / ckpt.SHARDED_DIR).iterdir()) == [".metadata", "__0_0.distcp",
                                                                           "__1_0.distcp"]

    expected = torch.load(out / "expected.pt")
    st = ckpt.load_checkpoint(last)  # whole tensors in this process, no process group
    assert st.step == 1 and st.metrics == {"loss": 0.5} and st.config == {"run_id": "r"}
    assert set(st.trainable) == set(expected["full"])
    assert all(torch.equal(st.trainable[k], v) for k, v in expected["full"].items())
    assert all(torch.equal(st.ema[k], v) for k, v in expected["ema"].items())

    # One unsharded process resumes: weights, Adam moments and EMA as the two ranks held them.
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ema = [torch.zeros_like(p) for p in model.parameters()]
    back = ckpt.load_sharded(last, model, optimizer, ema)
    assert back.step == 1 and back.policy_version == 1
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), expected["full"][n]), n
        assert torch.equal(optimizer.state[p]["exp_avg"], expected["avg"][n]), n
        assert int(optimizer.state[p]["step"]) == 1
    assert all(torch.equal(e, expected["ema"][f"ema.{i}"]) for i, e in enumerate(ema))
