"""In-run evaluation on the EMA weights under Ray (issue 13, item 8): with `train.ema_decay` set, the learner
publishes its EMA shadow as an eval-only handle, the driver evaluates with it, and the rollouts keep sampling with
the live weights."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tests.tiny_runs import PROMPTS, tiny_cfg

pytestmark = pytest.mark.integration


def test_eval_only_weights_serve_the_eval_and_the_next_rollout_samples_live(ray_client, tmp_path):
    """RolloutCore: an eval with an eval-only handle samples with those weights, a rollout refuses it, and the
    rollout after the eval equals the one before it, tensor for tensor (the live weights are back)."""
    from flowbp_core.cache import TrajectoryCache
    from flowbp_core.step import step_plan
    from services.runtime import weight_sync
    from services.runtime.payloads import RolloutRequest
    from services.runtime.rollout import RolloutCore

    torch.set_num_threads(1)
    core = RolloutCore(tiny_cfg(tmp_path, "core"))
    g = torch.Generator().manual_seed(0)
    base = {k: torch.zeros(s) for k, s in core.merged.shapes.items()}  # the worker holds no adapter
    live = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    ema = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    sync = weight_sync.build("lora_delta")
    h = sync.publish(live, 1, 1)
    e = replace(sync.publish(ema, 1, 1), eval_only=True)  # same (generation, version) as the live handle
    plan = step_plan(core.comp.method, core.comp.n_steps, 0, 1)
    req = RolloutRequest(step=1, seed=0, prompts=tuple(PROMPTS[:2]), weights=h, total_batch=2, plan=plan)
    ereq = RolloutRequest(step=1, seed=7, prompts=tuple(PROMPTS[:2]), weights=e, total_batch=2)

    before, _ = core.run(req)
    img_ema = core.eval_images(ereq)
    after, stats = core.run(req)
    a, b = TrajectoryCache.from_buffer(after[0]), TrajectoryCache.from_buffer(before[0])
    assert stats.policy_version == 1 and a.meta == b.meta and a.prompts == b.prompts and a.plan == b.plan == plan
    assert torch.equal(a.final, b.final) and torch.equal(a.noise, b.noise)
    assert set(a.states) == set(b.states) and all(torch.equal(a.states[i], b.states[i]) for i in a.states)
    assert set(a.velocities) == set(b.velocities) and all(
        torch.equal(a.velocities[i], b.velocities[i]) for i in a.velocities)
    with pytest.raises(ValueError, match="eval-only"):
        core.run(replace(req, weights=e))
    img_live = core.eval_images(replace(ereq, weights=h))
    img_direct = core.eval_images(replace(ereq, weights=sync.publish(ema, 2, 1)))  # EMA as ordinary weights
    assert torch.equal(img_direct, img_ema)
    assert (img_live - img_ema).abs().max() > 1e-3


def test_ray_run_evaluates_the_ema_shadow_and_trains_as_without_eval(ray_client, tmp_path):
    """A Ray run with EMA and an eval after every step: each eval score is the one of the EMA weights of that
    step's checkpoint (computed here directly), not of its live weights, and the losses equal the single-process
    loop's (which runs no eval): the rollout after an eval sampled with the live weights."""
    from flowbp_core.checkpoint import load_checkpoint, step_dir
    from flowbp_core.run import load_prompts, train_loop
    from services.reward_serve.engine import build_reward
    from services.runtime import weight_sync
    from services.runtime.components import reward_panel
    from services.runtime.driver import Driver
    from services.runtime.payloads import RolloutRequest
    from services.runtime.rollout import RolloutCore

    torch.set_num_threads(1)
    cfg = tiny_cfg(tmp_path, "ema", train={"steps": 2, "lr": 5e-2, "ema_decay": 0.5},
                   reward={"terms": [{"name": "saturation"}], "loss": "neg_mean", "placement": "colocated"},
                   runtime={"rollout_workers": 1, "learners": 1, "rollout_num_cpus": 0.25, "learner_num_cpus": 0.5},
                   eval={"every": 1, "limit": 2, "prompts": {"prompts": PROMPTS[:2]}})
    drv = Driver(cfg)
    s = drv.run()
    assert s.status == "finished", s.failure
    assert sorted(s.eval_scores) == [1, 2]

    core = RolloutCore(cfg)
    keys = list(core.merged.shapes)  # the learner's parameter order (tests/backbones/test_merged_lora.py)
    reward = build_reward(*reward_panel(cfg))
    prompts = tuple(load_prompts(cfg.eval.prompts, cfg.eval.limit))
    sync = weight_sync.build("lora_delta")

    def score(step: int, state: dict[str, torch.Tensor], version: int) -> float:
        req = RolloutRequest(step=step, seed=cfg.eval.seed, prompts=prompts, weights=sync.publish(state, version, 9),
                             total_batch=len(prompts))
        with torch.no_grad():
            return float(reward(core.eval_images(req).float(), list(prompts)).float().mean())

    for step in (1, 2):
        st = load_checkpoint(step_dir(drv.run_dir, step))
        assert len(st.ema) == len(keys)
        ema_score = score(step, {k: st.ema[f"ema.{i}"] for i, k in enumerate(keys)}, 100 + step)
        live_score = score(step, st.trainable, 200 + step)
        got = s.eval_scores[step]["reward_mean"]
        assert got == pytest.approx(ema_score, rel=1e-5, abs=1e-7), step
        assert abs(got - ema_score) < 0.1 * abs(live_score - ema_score), (got, ema_score, live_score)

    ref = train_loop(cfg.model_copy(update={"run_id": "ref"}), run_dir=tmp_path / "ref")
    assert [r.loss for r in ref.results] == pytest.approx([s.losses[i] for i in range(2)], rel=1e-5, abs=1e-7)
