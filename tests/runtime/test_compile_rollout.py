"""`runtime.compile_rollout` (issue 16, item 1): the rollout worker's transformer is compiled in place with static
shapes. Its weight names stay the learner's (a full fine-tune's sync loads into it), one graph serves a shard whose
last micro-batch is short (padded) and every later sync (weights are copied into the tensors the graph reads), and
it samples what the eager worker samples within float32 rounding. `micro_batched(static=True)` copies each output
out of the model's buffer, as a CUDA graph's replay overwrites it."""

from __future__ import annotations

import pytest
import torch

from flowbp_core.sampling import micro_batched
from tests.tiny_runs import PROMPTS, tiny_cfg

BATCH = 3


def test_static_micro_batches_have_fixed_rows_and_own_their_outputs():
    buf = torch.empty(2, 1)  # one output buffer reused by every call, as a CUDA graph's replay does
    rows = []

    def bind(c):
        def v(x, sigma):
            rows.append(x.shape[0])
            return buf.copy_(x * c["w"] + sigma)

        return v

    w = torch.tensor([[1.0], [2.0], [3.0]])
    v = micro_batched(bind, {"w": w, "shared": torch.ones(1, 1)}, 3, 2, static=True)
    x = torch.tensor([[1.0], [1.0], [1.0]])
    out = v(x, 0.5)
    assert rows == [2, 2]  # the last chunk (1 row) padded to 2
    assert torch.equal(out, torch.tensor([[1.5], [2.5], [3.5]]))
    one = micro_batched(bind, {"w": w[:2]}, 2, None, static=True)
    first = one(torch.ones(2, 1), 0.0)
    one(torch.zeros(2, 1), 0.0)  # the next call overwrites the buffer, not the returned velocity
    assert first.data_ptr() != buf.data_ptr() and torch.equal(first, torch.tensor([[1.0], [2.0]]))
    with pytest.raises(ValueError, match="micro-batch size 0"):
        micro_batched(bind, {"w": w}, 3, 0, static=True)


def _cache(core, plan):
    from flowbp_core.cache import TrajectoryCache
    from services.runtime.payloads import RolloutRequest

    req = RolloutRequest(step=1, seed=0, prompts=tuple(PROMPTS[:BATCH]), weights=None, total_batch=BATCH, plan=plan)
    (blob,), _ = core.run(req)
    return TrajectoryCache.from_buffer(blob)


def _assert_same_samples(got, want):
    torch.testing.assert_close(got.final, want.final, rtol=1e-4, atol=1e-4)
    assert set(got.velocities) == set(want.velocities)
    for i in want.velocities:
        torch.testing.assert_close(got.velocities[i], want.velocities[i], rtol=1e-4, atol=1e-4)


@pytest.mark.integration
def test_compiled_rollout_loads_the_learners_weights_and_never_recompiles(tmp_path):
    from flowbp_core.step import step_plan
    from services.runtime.rollout import RolloutCore

    torch.set_num_threads(1)
    sections = dict(train={"batch_size": BATCH}, backbone={"finetune": "full"})
    compiled = RolloutCore(tiny_cfg(tmp_path, "c", **sections, runtime={"compile_rollout": True, "rollout_batch": 2}))
    eager = RolloutCore(tiny_cfg(tmp_path, "e", **sections, runtime={"rollout_batch": 2}))
    names = eager.backbone.trainable_state_dict().keys()
    assert compiled.backbone.trainable_state_dict().keys() == names  # no `_orig_mod.` prefix
    plan = step_plan(compiled.comp.method, compiled.comp.n_steps, 0, 1)
    g = torch.Generator().manual_seed(0)
    with torch._dynamo.config.patch(error_on_recompile=True):
        _assert_same_samples(_cache(compiled, plan), _cache(eager, plan))
        moved = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in
                 eager.backbone.trainable_state_dict().items()}
        before = _cache(eager, plan)
        for core in (compiled, eager):
            core.load(moved)
        after = _cache(compiled, plan)
    assert (after.final - before.final).abs().max() > 1e-3  # the synced weights reach the compiled graph
    _assert_same_samples(after, _cache(eager, plan))
