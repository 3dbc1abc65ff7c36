"""`runtime.strategy: fsdp`: two learner ranks (gloo on CPU, spawned here without Ray) that shard the tiny
SD3 transformer reproduce one unsharded learner on the whole batch: the same losses and gradient norms, the
same weights after the steps, and a resume (optimizer and EMA state re-sharded) that continues exactly where the
uninterrupted group is, bitwise. The publish gather leaves full tensors on rank 0's CPU and none on rank 1. LoRA
checkpoints are the `full` file a single process writes; full fine-tuning writes `sharded` ones (torch
distributed checkpoint) that one unsharded process resumes and exports to full diffusers weights, and an FSDP
group resumes from one process's `full` checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from services.localproc import free_port
from tests.tiny_runs import tiny_cfg, write_caches

pytestmark = pytest.mark.integration

STEPS = 3


def _cfg(tmp: Path, run_id: str, finetune: str, strategy: str):
    return tiny_cfg(tmp, run_id, backbone={"finetune": finetune, "lora": {"rank": 4}},
                    method={"name": "flowbp_sparse", "k": 2},
                    reward={"terms": [{"name": "saturation"}], "loss": "neg_mean", "placement": "colocated"},
                    train={"steps": STEPS, "batch_size": 4, "lr": 1e-3, "ema_decay": 0.9},
                    runtime={"learners": 2, "strategy": strategy})


def _rank_main(rank: int, world: int, port: int, cfg_json: str, cache_files: list[str], steps: list[int],
               out: str, save_steps: list[int] | None = None) -> None:
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
            if save_steps is None or s + 1 in save_steps:
                learner.save(s + 1, res)
        state = {k: v.clone() for k, v in learner.full_trainable_state().items()}
        # What the publish gather leaves on this rank: the full tensors on rank 0's CPU, nothing elsewhere.
        Path(out, f"held{rank}.json").write_text(json.dumps(
            {k: [list(v.shape), str(v.device), v.numel() * v.element_size()] for k, v in state.items()}))
        ema = learner.ema_trainable_state()  # the eval-only publish's gather (issue 13, item 8)
        assert all(torch.equal(v, state[k]) for k, v in learner.full_trainable_state().items()), "live weights moved"
        whole = sharding.gather_state(learner.backbone.transformer.state_dict(), rank0_only=True)
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


def _spawn(cfg, cache_files, steps, out: Path, save_steps: list[int] | None = None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    mp.spawn(_rank_main, args=(2, free_port(), cfg.model_dump_json(), cache_files, steps, str(out), save_steps),
             nprocs=2, join=True)
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

    # Two FSDP ranks: steps 0-2 (checkpoints after steps 0 and 1), then a fresh group resumes from the step_2
    # checkpoint and redoes step 2: the same loss, bitwise, as the run that went on.
    fsdp_cfg = _cfg(tmp_path / "fsdp", "fsdp", finetune, "fsdp")
    first = _spawn(fsdp_cfg, files, [0, 1, 2], tmp_path / "out1", save_steps=[1, 2])
    assert first["start_step"] == 0
    second = _spawn(fsdp_cfg, files, [2], tmp_path / "out2")
    assert second["start_step"] == 2
    assert second["losses"] == first["losses"][2:] and second["grad_norms"] == first["grad_norms"][2:]
    went_on, resumed = torch.load(tmp_path / "out1" / "state.pt"), torch.load(tmp_path / "out2" / "state.pt")
    assert all(torch.equal(resumed[k], v) for k, v in went_on.items())
    assert first["losses"] == pytest.approx(ref_losses, rel=1e-5, abs=1e-7)
    assert first["grad_norms"] == pytest.approx(ref_norms, rel=1e-4, abs=1e-7)
    assert all(n > 0 for n in first["grad_norms"])

    # The publish gather: rank 0 holds every full tensor on its CPU; rank 1 holds none.
    held0 = json.loads((tmp_path / "out2" / "held0.json").read_text())
    assert set(held0) == set(ref_state)
    assert all(shape == list(ref_state[k].shape) and dev == "cpu" for k, (shape, dev, _) in held0.items())
    assert json.loads((tmp_path / "out2" / "held1.json").read_text()) == {}

    state = resumed
    assert set(state) == set(ref_state)
    for k in ref_state:
        torch.testing.assert_close(state[k], ref_state[k], rtol=1e-4, atol=1e-6, msg=k)
    ema = torch.load(tmp_path / "out2" / "ema.pt")  # the gathered EMA shadow, under the trainable keys
    assert set(ema) == set(ref_ema)
    for k in ref_ema:
        torch.testing.assert_close(ema[k], ref_ema[k], rtol=1e-4, atol=1e-6, msg=k)

    run_dir = tmp_path / "fsdp" / "fsdp"
    last = ckpt.latest_complete(run_dir)
    st = ckpt.load_checkpoint(last)
    ref_st = ckpt.load_checkpoint(ckpt.latest_complete(tmp_path / "ref" / "ref"))
    assert st.step == ref_st.step == STEPS and st.policy_version == ref_st.policy_version == STEPS
    for k in ref_st.trainable:  # whole tensors, read by one process from either layout
        torch.testing.assert_close(st.trainable[k], ref_st.trainable[k], rtol=1e-4, atol=1e-6, msg=k)
    for k in ref_st.ema:
        torch.testing.assert_close(st.ema[k], ref_st.ema[k], rtol=1e-4, atol=1e-6, msg=k)

    if finetune == "lora":  # LoRA under FSDP: the `full` file a single process writes, gathered to rank 0
        assert ckpt.layout(last) == ckpt.FULL
        exp_avg = [v["exp_avg"] for v in st.optimizer["state"].values()]
        ref_avg = [v["exp_avg"] for v in ref_st.optimizer["state"].values()]
        assert [tuple(t.shape) for t in exp_avg] == [tuple(t.shape) for t in ref_avg]
        for a, b in zip(exp_avg, ref_avg):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
        from safetensors.torch import load_file

        ours = load_file(str(run_dir / f"step_{STEPS}" / "lora" / "pytorch_lora_weights.safetensors"))
        ref_dir = tmp_path / "ref" / "ref" / f"step_{STEPS}"
        theirs = load_file(str(ref_dir / "lora" / "pytorch_lora_weights.safetensors"))
        assert set(ours) == set(theirs) and ours
        for k in theirs:
            torch.testing.assert_close(ours[k], theirs[k], rtol=1e-4, atol=1e-6, msg=k)
        return

    # Full fine-tuning: a sharded checkpoint (each rank's shards, no whole copy written by anyone).
    assert ckpt.layout(last) == ckpt.SHARDED and st.optimizer is None
    assert sorted(f.name for f in (last / ckpt.SHARDED_DIR).iterdir()) == [".metadata", "__0_0.distcp",
                                                                           "__1_0.distcp"]
    assert not (last / "trainable.safetensors").exists()
    # The live export of the sharded transformer (gathered to rank 0) loads with from_pretrained.
    transformer = type(ref.backbone.transformer).from_pretrained(str(tmp_path / "out2" / "export"),
                                                                 subfolder="transformer")
    got = transformer.state_dict()
    for k, v in ref.backbone.transformer.state_dict().items():
        torch.testing.assert_close(got[k], v, rtol=1e-4, atol=1e-6, msg=k)
    _full_finetune_crosses_strategies(tmp_path, ref_cfg, fsdp_cfg, files, second, resumed, ref_losses)


def _copy_step(src_run: Path, step: int, dst_run: Path) -> None:
    import shutil

    dst_run.mkdir(parents=True)
    shutil.copytree(src_run / f"step_{step}", dst_run / f"step_{step}")


def _full_finetune_crosses_strategies(tmp_path, ref_cfg, fsdp_cfg, files, second, resumed, ref_losses):
    """FSDP sharded -> one unsharded process -> full weights exported; one process's full checkpoint -> FSDP."""
    from flowbp_core import checkpoint as ckpt
    from flowbp_core.cache import TrajectoryCache
    from flowbp_core.export import export_backbone
    from flowbp_core.run import build_backbone, build_components, make_optimizer, restore
    from flowbp_core.training import EMA
    from services.runtime.learner import LearnerRank

    # One unsharded process resumes from the FSDP group's sharded step_2: the group's step-2 loss and weights.
    _copy_step(tmp_path / "fsdp" / "fsdp", 2, tmp_path / "one" / "one")
    one = LearnerRank(ref_cfg.model_copy(update={"checkpoint": ref_cfg.checkpoint.model_copy(
        update={"dir": str(tmp_path / "one")})}), "one")
    assert one.step == 2 and one.version == 2
    loaded = {k: {n: v.clone() if torch.is_tensor(v) else v for n, v in st.items()}
              for k, st in one.optimizer.state_dict()["state"].items()}
    assert loaded and all(int(st["step"]) == 2 for st in loaded.values())
    # train_loop's resume (run.restore) reads the same sharded checkpoint into the same state.
    comp = build_components(ref_cfg, text_encoders=False)
    optimizer = make_optimizer(ref_cfg, comp.backbone.trainable_parameters())
    ema = EMA(comp.backbone.trainable_parameters(), ref_cfg.train.ema_decay)
    assert restore(comp, tmp_path / "one" / "one" / "step_2", optimizer, ema).step == 2
    for k, st in optimizer.state_dict()["state"].items():
        assert all(torch.equal(st[n], loaded[k][n]) for n in ("exp_avg", "exp_avg_sq")), k
    assert all(torch.equal(a, b) for a, b in zip(ema.shadow, one.ema.shadow))
    res = one.train(2, TrajectoryCache.from_bytes(Path(files[2]).read_bytes()))
    assert res.loss == pytest.approx(second["losses"][0], rel=1e-5, abs=1e-7)
    for k, v in one.backbone.trainable_state_dict().items():
        torch.testing.assert_close(v, resumed[k], rtol=1e-4, atol=1e-6, msg=k)

    # The group's final sharded checkpoint, read by one process and exported: the full diffusers weights equal
    # the weights the group trained, bitwise.
    bb = build_backbone(ref_cfg, text_encoders=False)
    bb.load_trainable_state_dict(ckpt.load_checkpoint(ckpt.latest_complete(tmp_path / "fsdp" / "fsdp")).trainable)
    export_backbone(bb, tmp_path / "exported")
    transformer = type(bb.transformer).from_pretrained(str(tmp_path / "exported"), subfolder="transformer")
    got = dict(transformer.named_parameters())
    assert set(got) == set(resumed)
    assert all(torch.equal(got[k].detach(), v) for k, v in resumed.items())

    # The other way: an FSDP group resumes from one process's full checkpoint (step_2 of the reference run).
    _copy_step(tmp_path / "ref" / "ref", 2, tmp_path / "back" / "back")
    back_cfg = fsdp_cfg.model_copy(update={"checkpoint": fsdp_cfg.checkpoint.model_copy(
        update={"dir": str(tmp_path / "back")})})
    back = _spawn(back_cfg.model_copy(update={"run_id": "back"}), files, [2], tmp_path / "out3")
    assert back["start_step"] == 2
    assert back["losses"] == pytest.approx(ref_losses[2:], rel=1e-5, abs=1e-7)


def test_fsdp_with_one_learner_is_refused_with_the_fix(tmp_path):
    from flowbp_core.errors import ConfigError
    from services.runtime.driver import Driver

    cfg = _cfg(tmp_path, "one", "lora", "fsdp").model_copy(deep=True)
    cfg.runtime.learners = 1
    with pytest.raises(ConfigError, match="runtime.learners >= 2"):
        Driver(cfg)
