"""The learner group's collectives on two gloo ranks spawned here without Ray (the tiny SD3, seconds a test):
every small collective on the group's device, all ranks skipping together before FSDP's backward, one resume
step for all ranks, and DRaFT-LV's re-noising on two ranks equal to one rank's.
"""

from __future__ import annotations

import json
import os
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from services.localproc import free_port
from tests.tiny_runs import tiny_cfg, write_caches

pytestmark = pytest.mark.integration

GROUP_DEADLINE_S = 600.0  # both ranks import torch and build the model: minutes on a loaded 2-core machine


def _cfg(tmp: Path, run_id: str, strategy: str = "fsdp", method: dict | None = None, steps: int = 2, batch: int = 4):
    from flowbp_core.config import config_from_dict

    cfg = tiny_cfg(tmp, run_id, backbone={"finetune": "lora", "lora": {"rank": 4}},
                   reward={"terms": [{"name": "saturation"}], "loss": "neg_mean", "placement": "colocated"},
                   train={"steps": steps, "batch_size": batch, "lr": 1e-3},
                   runtime={"learners": 2, "strategy": strategy})
    return config_from_dict({**cfg.to_dict(), "method": method or {"name": "flowbp_sparse", "k": 2}})


def _rank_entry(rank: int, world: int, port: int, scenario, args: tuple, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # A group timeout: a rank left alone in a collective fails the test instead of hanging it.
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=300))
    try:
        result = scenario(rank, world, *args)
    except BaseException:  # noqa: BLE001 - written for the parent to report
        result = {"error": traceback.format_exc()}
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def run_group(scenario, args: tuple, out: Path, world: int = 2) -> list[dict]:
    """Run `scenario(rank, world, *args)` on `world` gloo ranks; each rank's JSON result, in rank order."""
    out.mkdir(parents=True, exist_ok=True)
    ctx = mp.start_processes(_rank_entry, args=(world, free_port(), scenario, args, str(out)), nprocs=world,
                             join=False, start_method="spawn")
    import time

    deadline = time.monotonic() + GROUP_DEADLINE_S
    while not ctx.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the learner group did not finish within {GROUP_DEADLINE_S:.0f} s (a rank hung)")
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    for r, res in enumerate(results):
        assert "error" not in res, f"rank {r}:\n{res['error']}"
    return results


# ------------------------------------------------------------------------------------------------ scenarios
def _record_collectives(devices: list[str]) -> None:
    """Wrap torch.distributed's all_reduce and broadcast so that each tensor's device is logged."""
    import torch.distributed as dist

    for name in ("all_reduce", "broadcast"):
        inner = getattr(dist, name)

        def wrapped(t, *a, _inner=inner, **kw):
            devices.append(str(t.device))
            return _inner(t, *a, **kw)

        setattr(dist, name, wrapped)


def _resume_skip_then_step(rank: int, world: int, cfg_json: str, cache_files: list[str]) -> dict:
    """Resume (rank 1's listing of the checkpoints is stale), step 1 with a non-finite reward on rank 1 only,
    then a normal step 2."""
    import torch.distributed as dist

    from flowbp_core import checkpoint as ckpt
    from flowbp_core.cache import TrajectoryCache
    from flowbp_core.config import RunConfig
    from flowbp_core.reducers import collective_device
    from services.runtime.learner import LearnerRank

    devices: list[str] = []
    _record_collectives(devices)
    if rank == 1:
        ckpt.latest_complete = lambda run_dir: None
    cfg = RunConfig.model_validate_json(cfg_json)
    learner = LearnerRank(cfg, cfg.run_id, rank, world)
    score = learner.comp.score_fn()
    out = {"device": str(collective_device(dist)), "start_step": learner.step, "steps": []}
    for s in (1, 2):
        poisoned = rank == 1 and s == 1
        learner.score = (lambda z, p: score(z, p) * float("nan")) if poisoned else score
        cache = TrajectoryCache.from_bytes(Path(cache_files[s]).read_bytes())
        res = learner.train(s, cache.split(cache.batch_size // world)[rank])
        out["steps"].append({"skipped": res.skipped, "reason": res.skip_reason, "grad_norm": res.grad_norm,
                             "loss": res.loss})
    out["devices"] = devices
    return out


# ------------------------------------------------------------------------------------------------ tests
def test_fsdp_group_resumes_together_skips_together_and_matches_one_rank(tmp_path):
    """Two FSDP ranks training DRaFT-LV: one resume step for both although rank 1 lists no checkpoint; a
    non-finite reward on rank 1 alone skips the step on both (no hang in FSDP's backward); the next step's loss
    and gradient norm are one unsharded rank's on the whole batch; every small collective on the group's device."""
    from flowbp_core.cache import TrajectoryCache
    from flowbp_core.run import build_components
    from services.runtime.learner import LearnerRank

    torch.set_num_threads(1)
    cfg = _cfg(tmp_path, "grp", method={"name": "draft_lv", "n": 2}, steps=3)
    ref_cfg = cfg.model_copy(update={"runtime": cfg.runtime.model_copy(update={"strategy": "ddp", "learners": 1})})
    files = write_caches(build_components(ref_cfg, trainable=False), 3, tmp_path)  # a rollout worker's encoders
    ref = LearnerRank(ref_cfg, "grp")
    # One rank on the whole batch: step 0, the checkpoint the group resumes from, then step 2 (step 1 is skipped).
    res0 = ref.train(0, TrajectoryCache.from_bytes(Path(files[0]).read_bytes()))
    ref.save(1, res0)
    res2 = ref.train(2, TrajectoryCache.from_bytes(Path(files[2]).read_bytes()))
    del ref

    ranks = run_group(_resume_skip_then_step, (cfg.model_dump_json(), files), tmp_path / "out")
    assert [r["start_step"] for r in ranks] == [1, 1]
    assert [r["steps"][0]["reason"] for r in ranks] == ["non_finite_on_other_rank", "non_finite_reward"]
    for r in ranks:
        assert r["steps"][0]["skipped"] and not r["steps"][1]["skipped"]
        assert r["steps"][1]["loss"] == pytest.approx(res2.loss, rel=1e-5, abs=1e-7)
        assert r["steps"][1]["grad_norm"] == pytest.approx(res2.grad_norm, rel=1e-4, abs=1e-8)
        assert r["devices"] and set(r["devices"]) == {r["device"]}


class _FakeGroup:
    def __init__(self, backend: str):
        self.backend = backend

    def get_backend(self) -> str:
        return self.backend


@pytest.mark.parametrize("backend, expected", [("gloo", "cpu"), ("nccl", "cuda:0"), ("cpu:gloo,cuda:nccl", "cuda:0")])
def test_collective_device_is_the_one_the_group_reduces(monkeypatch, backend, expected):
    from flowbp_core.reducers import collective_device

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert collective_device(_FakeGroup(backend)) == torch.device(expected)


def test_gpu_learner_group_has_a_backend_for_cpu_and_cuda_tensors(tmp_path):
    from services.runtime.learner import make_trainer

    cfg = _cfg(tmp_path, "gpu", strategy="ddp")
    cpu = make_trainer(cfg, "gpu", None, None, str(tmp_path / "train"))
    assert cpu.backend_config.backend == "gloo"
    cfg.runtime.use_gpu = True
    gpu = make_trainer(cfg, "gpu", None, None, str(tmp_path / "train"))
    assert gpu.backend_config.backend == "cpu:gloo,cuda:nccl"


def test_draft_lv_renoising_of_two_halves_is_that_of_the_whole_batch(tmp_path):
    from flowbp_core.run import build_components, rollout_for

    torch.set_num_threads(1)
    comp = build_components(_cfg(tmp_path, "lv", strategy="ddp", method={"name": "draft_lv", "n": 2}),
                            trainable=False)
    cache = rollout_for(comp, 0, 0)
    b = cache.batch_size

    def endpoint(c):
        with torch.no_grad():
            return comp.method.endpoint(c, comp.backbone.bind(c.cond, comp.guidance)).value

    whole = endpoint(cache).unflatten(0, (3, b))
    halves = [endpoint(part).unflatten(0, (3, b // 2)) for part in cache.split(b // 2)]
    torch.testing.assert_close(torch.cat(halves, 1), whole, rtol=1e-5, atol=1e-6)


def test_uneven_learner_split_is_refused_naming_the_fields_and_what_fits(tmp_path):
    from flowbp_core.errors import ConfigError
    from services.runtime.driver import Driver

    cfg = _cfg(tmp_path, "uneven", strategy="ddp", batch=10)
    cfg.runtime.learners = 4
    with pytest.raises(ConfigError) as err:
        Driver(cfg)
    msg = str(err.value)
    assert "train.batch_size=10" in msg and "runtime.learners=4" in msg
    assert "8 or 12" in msg and "[1, 2, 5, 10]" in msg


def test_multi_node_run_with_a_relative_checkpoint_dir_is_refused(tmp_path):
    from flowbp_core.errors import ConfigError
    from services.runtime.driver import check_checkpoint_dir

    cfg = _cfg(tmp_path, "nodes")
    cfg.checkpoint.dir = "runs"
    check_checkpoint_dir(cfg, nodes=1)
    with pytest.raises(ConfigError, match=r"checkpoint.dir='runs'.*absolute path on a filesystem that all 3 nodes"):
        check_checkpoint_dir(cfg, nodes=3)
    cfg.checkpoint.dir = str(tmp_path)
    check_checkpoint_dir(cfg, nodes=3)


class _TwoEqualRanks:
    """A stand-in group of two ranks holding the same tensors: an all-reduce doubles; calls are counted."""

    def __init__(self):
        self.calls = 0

    def all_reduce(self, t):
        self.calls += 1
        t.mul_(2)


def test_gradients_are_averaged_in_flat_buckets_not_one_call_per_tensor():
    from flowbp_core.reducers import all_reduce_mean

    torch.manual_seed(0)
    grads = [torch.randn(64, 64) for _ in range(10)] + [torch.randn(300, 300), torch.randn(7)]
    before = [g.clone() for g in grads]
    group = _TwoEqualRanks()
    n = all_reduce_mean(group, grads, world=2, bucket_bytes=64 * 64 * 4 * 4)
    # 10 x 16 KiB in buckets of 64 KiB (3), the 352 KiB tensor alone, the last one in a bucket of its own.
    assert n == group.calls == 5
    for g, b in zip(grads, before):
        torch.testing.assert_close(g, b, rtol=0, atol=0)


def test_a_learner_never_builds_a_text_encoder_and_trains_from_the_same_weights(tmp_path, constructed_models):
    """Every transformers model (the CLIPs, T5) is counted as it is constructed: a rollout-side build makes the CLIPs
    and T5, a learner none; its transformer and LoRA init equal the rollout-side build's, and it trains on the cache."""
    from flowbp_core.run import build_components, rollout_for
    from services.runtime.learner import LearnerRank

    built = constructed_models
    torch.set_num_threads(1)
    cfg = _cfg(tmp_path, "notext", strategy="ddp")
    cfg.runtime.learners = 1
    rollout = build_components(cfg, trainable=True)  # a rollout worker's (and train_loop's) build
    assert {"CLIPTextModelWithProjection", "T5EncoderModel"} <= set(built)
    cache = rollout_for(rollout, 0, 0)
    built.clear()
    learner = LearnerRank(cfg, "notext")
    assert built == []
    for k, v in rollout.backbone.transformer.state_dict().items():
        assert torch.equal(learner.backbone.transformer.state_dict()[k], v), k
    with pytest.raises(RuntimeError, match="holds no text encoder"):
        learner.backbone.encode_prompts(["a red cube"])
    res = learner.train(0, cache)
    assert not res.skipped and res.grad_norm > 0
