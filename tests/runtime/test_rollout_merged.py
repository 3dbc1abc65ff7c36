"""The rollout worker samples on merged LoRA weights (issue 16, item 1): `RolloutCore` with a synced adapter
(through the object store, `lora_delta`) and `runtime.rollout_batch` samples what the learner's adapter backbone
samples in one batch, within float32 rounding, and a second sync leaves base + the latest delta only."""

from __future__ import annotations

import pytest
import torch

from tests.tiny_runs import PROMPTS, tiny_cfg

pytestmark = pytest.mark.integration

BATCH = 3


def _random_state(keys_shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: 0.1 * torch.randn(s, generator=g) for k, s in keys_shapes.items()}


def _caches(core, weights, plan, step: int = 1):
    from flowbp_core.cache import TrajectoryCache
    from services.runtime.payloads import RolloutRequest

    req = RolloutRequest(step=step, seed=0, prompts=tuple(PROMPTS[:BATCH]), weights=weights, total_batch=BATCH,
                         plan=plan)
    (blob,), stats = core.run(req)
    return TrajectoryCache.from_buffer(blob), stats


def test_rollout_worker_samples_merged_weights_as_the_adapter_and_a_sync_replaces(ray_client, tmp_path):
    from flowbp_core.run import build_components
    from flowbp_core.step import rollout_step, step_plan
    from services.runtime import weight_sync
    from services.runtime.rollout import RolloutCore

    torch.set_num_threads(1)
    cfg = tiny_cfg(tmp_path, "merged", train={"batch_size": BATCH}, runtime={"rollout_batch": 2})
    core = RolloutCore(cfg)
    assert not core.backbone.trainable_parameters() and not hasattr(core.backbone.transformer, "peft_config")
    learner = build_components(cfg, with_reward=False).backbone  # the learner's build: a peft adapter
    shapes = {k: tuple(v.shape) for k, v in learner.trainable_state_dict().items()}
    assert shapes == core.merged.shapes
    s1, s2 = _random_state(shapes, 1), _random_state(shapes, 2)
    sync = weight_sync.build("lora_delta")
    plan = step_plan(core.comp.method, core.comp.n_steps, 0, 1)

    got1, stats = _caches(core, sync.publish(s1, 1, 1), plan)
    assert stats.policy_version == 1 and stats.sync_seconds > 0
    learner.load_trainable_state_dict(s1)
    want1 = rollout_step(backbone=learner, guidance=core.comp.guidance, plan=plan, prompts=list(PROMPTS[:BATCH]),
                         seed=0, step=1, policy_version=1, state_dtype=torch.float32, device=torch.device("cpu"))
    base, _ = _caches(RolloutCore(cfg), None, plan)
    assert (want1.final - base.final).abs().max() > 1e-3  # the adapter moves the samples
    torch.testing.assert_close(got1.final, want1.final, rtol=1e-5, atol=1e-5)
    assert set(got1.states) == set(want1.states)
    for i in want1.states:
        torch.testing.assert_close(got1.states[i], want1.states[i], rtol=1e-5, atol=1e-5)

    got2, _ = _caches(core, sync.publish(s2, 2, 1), plan)  # the second sync, onto merged s1
    fresh, _ = _caches(RolloutCore(cfg), sync.publish(s2, 2, 1), plan)  # s2 as a first sync
    assert torch.equal(got2.final, fresh.final)
    assert all(torch.equal(got2.states[i], fresh.states[i]) for i in fresh.states)
