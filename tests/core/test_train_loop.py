"""The single-process loop on the tiny SD3 backbone: it learns, resumes exactly, and skips poisoned steps."""

import json

import pytest
import torch

from flowbp_core.checkpoint import latest_complete, list_complete
from flowbp_core.config import config_from_dict
from flowbp_core.cache import TrajectoryCache
from flowbp_core.run import build_components, rollout_for, train_loop
from flowbp_core.step import step_plan
from flowbp_core.training import NonFiniteStreak, PromptSampler

PROMPTS = ["a red circle", "two blue squares", "a green triangle on the left", "one yellow disk"]


def tiny_cfg(tmp_path, **over):
    base = {
        "run_id": "t",
        "backbone": {"name": "sd3", "tiny": True, "device": "cpu", "lora": {"rank": 4}},
        "method": {"name": "flowbp_sparse", "k": 2},
        "reward": {"terms": [{"name": "saturation"}], "loss": "neg_mean"},
        "sampling": {"n_steps": 6, "guidance_scale": 2.0},
        "train": {"steps": 4, "batch_size": 2, "lr": 5e-3, "seed": 3, "prompts": {"prompts": PROMPTS}},
        "checkpoint": {"dir": str(tmp_path), "every": 2},
    }
    return config_from_dict(base, [f"{k}={v}" for k, v in over.items()])


def test_prompt_sampler_is_a_function_of_seed_and_step():
    a, b = PromptSampler(PROMPTS, 3, seed=1), PromptSampler(PROMPTS, 3, seed=1)
    assert [a.batch(t) for t in range(5)] == [b.batch(t) for t in range(5)]
    assert sorted(a.batch(0) + [a.batch(1)[0]]) == sorted(PROMPTS)  # one epoch is a permutation


def test_cache_is_pinned_and_compacted_for_the_plan(tmp_path):
    comp = build_components(tiny_cfg(tmp_path))
    cache = rollout_for(comp, step=0, policy_version=7)
    assert cache.policy_version == 7 and cache.prompts == comp.prompts.batch(0)
    assert cache.n_steps == 6 and len(cache.states) <= 6
    assert cache.plan == step_plan(comp.method, 6, comp.cfg.train.seed, 0)  # the plan travels in the cache
    assert set(cache.states) == cache.plan.needs().states
    assert TrajectoryCache.from_bytes(cache.to_bytes()).plan == cache.plan


def test_loop_checkpoints_and_resume_reproduces_losses(tmp_path):
    full = train_loop(tiny_cfg(tmp_path / "a"))
    assert [c.step for c in list_complete(full.run_dir)] == [2, 4]
    losses_full = [r.loss for r in full.results]

    cfg_b = tiny_cfg(tmp_path / "b")
    part = train_loop(cfg_b.model_copy(update={"train": cfg_b.train.model_copy(update={"steps": 2})}))
    assert latest_complete(part.run_dir).name == "step_2"
    resumed = train_loop(cfg_b)
    assert resumed.resumed_from == 2
    losses_resumed = [r.loss for r in part.results] + [r.loss for r in resumed.results]
    assert losses_resumed == losses_full  # bitwise: noise, plan and prompts are functions of (seed, step)
    lines = [json.loads(x) for x in (resumed.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [0, 1, 2, 3]  # each step counted once
    assert list(lines[0]["timings"]) == ["rollout", "surrogate", "reward", "backward", "update"]  # stages.STAGES


def test_non_finite_reward_skips_and_streak_fails(tmp_path):
    cfg = tiny_cfg(tmp_path, **{"train.max_bad_steps": 2})
    comp = build_components(cfg)
    before = {k: v.clone() for k, v in comp.backbone.trainable_state_dict().items()}
    comp.reward = lambda images, prompts: images.mean(dim=(1, 2, 3)) * float("nan")
    seen = []
    with pytest.raises(NonFiniteStreak, match="2 steps in a row"):
        train_loop(cfg, comp=comp, on_step=seen.append)
    assert all(r.skipped and r.skip_reason == "non_finite_reward" for r in seen)
    after = comp.backbone.trainable_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing of a poisoned step applied
    assert latest_complete(tmp_path / "t") is None  # and no checkpoint written from it
