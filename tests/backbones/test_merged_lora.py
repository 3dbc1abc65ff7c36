"""Rollout-side LoRA (issue 16, item 1): a plain backbone with the synced adapter folded into its weights
(`MergedLoRA`) samples as the peft adapter does, a sync replaces the previous delta, and micro-batched sampling
equals one batch."""

from __future__ import annotations

import pytest
import torch

from flowbp_core import backbones, methods
from flowbp_core.backbones import LoRAConfig
from flowbp_core.sampling import micro_batched, rollout
from flowbp_core.step import rollout_step

PROMPTS = ["a red cube", "two blue spheres", "a green cone"]
CFG = LoRAConfig(rank=2, alpha=4.0)  # scale 2: a wrong scale cannot pass
N = 4


def _state(bb_with_adapter, seed: int, step: float = 0.05) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: step * torch.randn(v.shape, generator=g) for k, v in bb_with_adapter.trainable_state_dict().items()}


def _pair(name: str, dtype=torch.float32):
    """(adapter backbone, plain backbone + its MergedLoRA), same base weights."""
    adapter = backbones.build(name, tiny=True, seed=0, dtype=dtype)
    adapter.apply_lora(CFG)
    plain = backbones.build(name, tiny=True, seed=0, dtype=dtype)
    return adapter, plain, plain.merged_lora(CFG)


def _final(bb, seed: int = 3) -> torch.Tensor:
    cond = bb.encode_prompts(PROMPTS[:2])
    noise = torch.randn(bb.latent_shape(2), generator=torch.Generator().manual_seed(seed)).to(bb.dtype)
    return rollout(bb.bind(cond), noise, bb.schedule(N).sigmas, cond=cond, prompts=PROMPTS[:2]).final


@pytest.mark.parametrize("name", ["sd3", "flux1", "flux2"])
def test_merged_weights_sample_as_the_adapter(name):
    adapter, plain, merged = _pair(name)
    assert list(merged.shapes) == list(adapter.trainable_state_dict())  # the learner's keys, in its order
    assert not plain.trainable_parameters()  # the rollout copy trains nothing
    sd = _state(adapter, 1)
    adapter.load_trainable_state_dict(sd)
    merged.load(sd)
    with torch.no_grad():
        want, got, base = _final(adapter), _final(plain), _final(backbones.build(name, tiny=True, seed=0))
    assert (want - base).abs().max() > 1e-3  # the adapter moves the sample
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_merged_bf16_sampling_is_within_bf16_rounding_of_the_adapter():
    ref_adapter, _, _ = _pair("sd3")
    adapter, plain, merged = _pair("sd3", torch.bfloat16)
    sd = _state(ref_adapter, 1, step=0.2)
    for bb, load in ((ref_adapter, ref_adapter.load_trainable_state_dict), (adapter, adapter.load_trainable_state_dict),
                     (plain, merged.load)):
        load(sd)
    with torch.no_grad():
        exact, via_adapter, via_merge = _final(ref_adapter), _final(adapter), _final(plain)
    err_adapter = (via_adapter - exact).abs().max()
    err_merge = (via_merge - exact).abs().max()
    assert (via_merge - via_adapter).abs().max() < 0.05 * exact.abs().max()
    assert err_merge <= 2 * err_adapter + 1e-3, (err_merge, err_adapter)


def _exact_state(merged, seed: int) -> dict[str, torch.Tensor]:
    """Entries in {-0.25, 0, 0.25}: B A and scale * B A are exact in float32, so W0 + delta rounds once."""
    g = torch.Generator().manual_seed(seed)
    return {k: 0.25 * torch.randint(-1, 2, s, generator=g).float() for k, s in merged.shapes.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_sync_replaces_the_previous_delta(dtype):
    """Two syncs in a row leave W0 + (alpha / r) B2 A2 (closed form), bitwise what a first sync of the second
    state gives; a zero adapter gives W0 back bitwise."""
    plain = backbones.build("sd3", tiny=True, seed=0, dtype=dtype)
    merged = plain.merged_lora(CFG)
    w0 = {n: m.weight.detach().clone() for n, m in merged.layers.items()}
    s1, s2 = _exact_state(merged, 1), _exact_state(merged, 2)
    merged.load(s1)
    merged.load(s2)
    fresh = backbones.build("sd3", tiny=True, seed=0, dtype=dtype).merged_lora(CFG)
    fresh.load(s2)
    for n, m in merged.layers.items():
        a, b = s2[f"{n}.lora_A.default.weight"], s2[f"{n}.lora_B.default.weight"]
        want = (w0[n].float() + 2.0 * (b @ a)).to(dtype)
        assert torch.equal(m.weight, want), n
        assert torch.equal(m.weight, fresh.layers[n].weight), n
    merged.load({k: torch.zeros(s) for k, s in merged.shapes.items()})
    assert all(torch.equal(m.weight, w0[n]) for n, m in merged.layers.items())


def test_merged_lora_refuses_an_adapter_backbone_and_names_a_wrong_key():
    adapter, _, merged = _pair("sd3")
    with pytest.raises(ValueError, match="without a LoRA adapter"):
        adapter.merged_lora(CFG)
    sd = {k: torch.zeros(s) for k, s in merged.shapes.items()}
    key = next(iter(sd))
    with pytest.raises(ValueError, match="1 missing"):
        merged.load({k: v for k, v in sd.items() if k != key})
    with pytest.raises(ValueError, match=f"{key}.*shape"):
        merged.load({**sd, key: torch.zeros(1)})


@pytest.mark.parametrize("size", [1, 2])
def test_micro_batches_sample_as_one_batch(size):
    """A step's rollout in micro-batches of `size` (true CFG: both branches in one transformer call) equals the
    one-batch rollout, and the transformer really saw 2 x size rows at a time."""
    bb = backbones.build("sd3", tiny=True, seed=0)
    assert bb.preset.guidance.mode == "true"
    method = methods.build("flowbp_sparse", backbone=bb.preset.method_preset, k=2)
    plan = method.plan(N, torch.Generator().manual_seed(0))
    kw = dict(backbone=bb, guidance=bb.preset.guidance, plan=plan, prompts=PROMPTS, seed=5, step=2,
              policy_version=0, state_dtype=torch.float32, device=torch.device("cpu"))
    whole = rollout_step(**kw)
    rows: list[int] = []
    forward = bb._forward
    bb._forward = lambda x, *a: (rows.append(x.shape[0]), forward(x, *a))[1]
    parts = rollout_step(**kw, micro_batch=size)
    want_rows = [2 * min(size, len(PROMPTS) - a) for a in range(0, len(PROMPTS), size)]
    assert rows == want_rows * N
    torch.testing.assert_close(parts.final, whole.final, rtol=1e-5, atol=1e-5)
    assert set(parts.states) == set(whole.states) and set(parts.velocities) == set(whole.velocities)
    for i in whole.velocities:
        torch.testing.assert_close(parts.velocities[i], whole.velocities[i], rtol=1e-5, atol=1e-5)
    assert torch.equal(parts.noise, whole.noise) and parts.cond.keys() == whole.cond.keys()


def test_micro_batched_velocity_refuses_another_batch():
    v = micro_batched(lambda c: (lambda x, s: x * c["w"][: x.shape[0]]), {"w": torch.ones(4, 1)}, 4, 3)
    assert torch.equal(v(torch.arange(4.0).view(4, 1), 0.5), torch.arange(4.0).view(4, 1))
    with pytest.raises(ValueError, match="batch of 4 got a state batch of 2"):
        v(torch.ones(2, 1), 0.5)
