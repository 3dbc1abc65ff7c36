"""`runtime.strategy: fsdp`: two learner ranks (gloo on CPU, spawned here without Ray) that shard the tiny
SD3 transformer reproduce one unsharded learner on the whole batch: the same losses and gradient norms, the
same weights after the steps, a checkpoint that a single process loads, and a resume (optimizer and EMA state
re-sharded) that continues exactly where an uninterrupted run would be. LoRA and full fine-tuning.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tests.runtime.helpers import tiny_cfg, write_caches

pytestmark = pytest.mark.integration

STEPS = 3


def _cfg(tmp: Path, run_id: str, finetune: str, strategy: str):
    return tiny_cfg(tmp, run_id, backbone={"finetune": finetune, "lora": {"rank": 4}},
                    method={"name": "flowbp_sparse", "k": 2},
                    reward={"terms": [{"name": "saturation"}], "loss": "neg_mean", "placement": "colocated"},
                    train={"steps": STEPS, "batch_size": 4, "lr": 1e-3, "ema_decay": 0.9},
                    runtime={"learners": 2, "strategy": strategy})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, cfg_json: str, cache_files: list[str], steps: list[int],
               out: str) -> None:
    import torch.distributed as dist

    from flowbp_core.cache import TrajectoryCache
    from flowbp_core.config import RunConfig
    from services.runtime import sharding
    from services.runtime.learner import LearnerRank

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        cfg = RunConfig.model_validate_json(cfg_json)
        learner = LearnerRank(cfg, cfg.run_id, rank, world)
        assert learner.sharded and sharding.is_sharded(learner.params[0])
        log = {"start_step": learner.step, "losses": [], "grad_norms": []}
        for s in steps:
            cache = TrajectoryCache.from_bytes(Path(cache_files[s]).read_bytes())
            res = learner.train(s, cache.split(cache.batch_size // world)[rank])
            log["losses"].append(res.loss)
            log["grad_norms"].append(res.grad_norm)
            learner.save(s + 1, res)
        state = {k: v.clone() for k, v in learner.full_trainable_state().items()}
        ema = learner.ema_trainable_state()  # the eval-only publish's gather (issue 13, item 8)
        assert all(torch.equal(v, state[k]) for k, v in learner.full_trainable_state().items()), "live weights moved"
        whole = sharding.gather_state(learner.backbone.transformer.state_dict())
        if rank == 0:
            Path(out, "log.json").write_text(json.dumps(log))
            torch.save(state, Path(out, "state.pt"))
            torch.save(ema, Path(out, "ema.pt"))
            if cfg.backbone.finetune == "full":
                from flowbp_core.export import export_backbone

                export_backbone(learner.backbone, Path(out, "export"), gathered=whole)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _spawn(cfg, cache_files, steps, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    mp.spawn(_rank_main, args=(2, _free_port(), cfg.model_dump_json(), cache_files, steps, str(out)), nprocs=2,
             join=True)
    return json.loads((out / "log.json").read_text())


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_fsdp_two_ranks_match_one_unsharded_learner_and_resume(tmp_path, finetune):
    from flowbp_core import checkpoint as ckpt
    from flowbp_core.run import build_components
    from services.runtime.learner import LearnerRank

    torch.set_num_threads(1)
    # Caches of 3 steps from the initial weights (the equivalence does not need them on-policy).
    ref_cfg = _cfg(tmp_path / "ref", "ref", finetune, "ddp")
    files = write_caches(build_components(ref_cfg, trainable=False), STEPS, tmp_path)

    # One unsharded learner on the whole batch (no process group: the single-process update).
    ref = LearnerRank(ref_cfg, "ref")
    from flowbp_core.cache import TrajectoryCache

    ref_losses, ref_norms = [], []
    for s in range(STEPS):
        res = ref.train(s, TrajectoryCache.from_bytes(Path(files[s]).read_bytes()))
        ref_losses.append(res.loss)
        ref_norms.append(res.grad_norm)
        ref.save(s + 1, res)
    ref_state = {k: v.clone() for k, v in ref.backbone.trainable_state_dict().items()}
    ref_ema = ref.ema_trainable_state()
    assert all(torch.equal(v, ref_state[k]) for k, v in ref.backbone.trainable_state_dict().items())
    assert any(not torch.equal(ref_ema[k], ref_state[k]) for k in ref_state)

    # Two FSDP ranks: steps 0-1, then a fresh group resumes from the step_2 checkpoint and does step 2.
    fsdp_cfg = _cfg(tmp_path / "fsdp", "fsdp", finetune, "fsdp")
    first = _spawn(fsdp_cfg, files, [0, 1], tmp_path / "out1")
    assert first["start_step"] == 0
    second = _spawn(fsdp_cfg, files, [2], tmp_path / "out2")
    assert second["start_step"] == 2
    losses = first["losses"] + second["losses"]
    norms = first["grad_norms"] + second["grad_norms"]
    assert losses == pytest.approx(ref_losses, rel=1e-5, abs=1e-7)
    assert norms == pytest.approx(ref_norms, rel=1e-4, abs=1e-7)
    assert all(n > 0 for n in norms)

    state = torch.load(tmp_path / "out2" / "state.pt")
    assert set(state) == set(ref_state)
    for k in ref_state:
        torch.testing.assert_close(state[k], ref_state[k], rtol=1e-4, atol=1e-6, msg=k)
    ema = torch.load(tmp_path / "out2" / "ema.pt")  # the gathered EMA shadow, under the trainable keys
    assert set(ema) == set(ref_ema)
    for k in ref_ema:
        torch.testing.assert_close(ema[k], ref_ema[k], rtol=1e-4, atol=1e-6, msg=k)

    # The FSDP checkpoint is an ordinary one: full tensors, loadable by a single process, equal to the reference's.
    run_dir = tmp_path / "fsdp" / "fsdp"
    st = ckpt.load_checkpoint(ckpt.latest_complete(run_dir))
    ref_st = ckpt.load_checkpoint(ckpt.latest_complete(tmp_path / "ref" / "ref"))
    assert st.step == ref_st.step == STEPS and st.policy_version == ref_st.policy_version == STEPS
    for k in ref_st.trainable:
        torch.testing.assert_close(st.trainable[k], ref_st.trainable[k], rtol=1e-4, atol=1e-6, msg=k)
    for k in ref_st.ema:
        torch.testing.assert_close(st.ema[k], ref_st.ema[k], rtol=1e-4, atol=1e-6, msg=k)
    exp_avg = [v["exp_avg"] for v in st.optimizer["state"].values()]
    ref_avg = [v["exp_avg"] for v in ref_st.optimizer["state"].values()]
    assert [tuple(t.shape) for t in exp_avg] == [tuple(t.shape) for t in ref_avg]
    for a, b in zip(exp_avg, ref_avg):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)

    if finetune == "lora":  # the checkpoint's diffusers LoRA file, written from gathered tensors
        from safetensors.torch import load_file

        ours = load_file(str(run_dir / f"step_{STEPS}" / "lora" / "pytorch_lora_weights.safetensors"))
        ref_dir = tmp_path / "ref" / "ref" / f"step_{STEPS}"
        theirs = load_file(str(ref_dir / "lora" / "pytorch_lora_weights.safetensors"))
        assert set(ours) == set(theirs) and ours
        for k in theirs:
            torch.testing.assert_close(ours[k], theirs[k], rtol=1e-4, atol=1e-6, msg=k)
    else:  # the full export of a sharded transformer loads with from_pretrained
        transformer = type(ref.backbone.transformer).from_pretrained(str(tmp_path / "out2" / "export"),
                                                                     subfolder="transformer")
        got = transformer.state_dict()
        for k, v in ref.backbone.transformer.state_dict().items():
            torch.testing.assert_close(got[k], v, rtol=1e-4, atol=1e-6, msg=k)


def test_fsdp_with_one_learner_is_refused_with_the_fix(tmp_path):
    from flowbp_core.errors import ConfigError
    from services.runtime.driver import Driver

    cfg = _cfg(tmp_path, "one", "lora", "fsdp").model_copy(deep=True)
    cfg.runtime.learners = 1
    with pytest.raises(ConfigError, match="runtime.learners >= 2"):
        Driver(cfg)
