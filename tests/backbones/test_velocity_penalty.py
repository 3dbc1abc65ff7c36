"""The velocity penalty to the base (flowbp_core.anchor): its value, its gradient, and the base it compares with."""

from __future__ import annotations

import pytest
import torch

from flowbp_core import backbones
from flowbp_core.anchor import BaseAnchor, adapters_off
from flowbp_core.backbones import LoRAConfig

PROMPTS = ["a red cube", "two blue spheres"]


def _lora(seed: int = 0, b_scale: float = 0.05):
    bb = backbones.build("sd3", tiny=True, seed=seed)
    bb.apply_lora(LoRAConfig(rank=2))
    with torch.no_grad():  # B starts at 0, so the adapter is the identity until it is moved
        for n, p in bb.transformer.named_parameters():
            if "lora_B" in n:
                p.normal_(0, b_scale, generator=torch.Generator().manual_seed(len(n)))
    return bb


def _inputs(bb):
    cond = bb.encode_prompts(PROMPTS)
    x = torch.randn(bb.latent_shape(2), generator=torch.Generator().manual_seed(3))
    return cond, x


def _moved_lora_at(sigma: float):
    """A backbone with a moved LoRA, an input, its bound velocity and the LoRA model's velocity there."""
    bb = _lora()
    cond, x = _inputs(bb)
    velocity = bb.bind(cond)
    with torch.no_grad():
        v_lora = velocity(x, sigma)
    return bb, x, velocity, v_lora


def test_penalty_is_the_mean_squared_distance_to_the_model_with_its_lora_off():
    bb, x, velocity, v_lora = _moved_lora_at(0.6)
    with torch.no_grad():
        bb.transformer.disable_adapters()
        v_base = velocity(x, 0.6)
        bb.transformer.enable_adapters()
    assert not torch.allclose(v_lora, v_base), "the moved LoRA must change the velocity for this test to mean much"
    anchor = BaseAnchor(bb, velocity)
    v = anchor(x, 0.6)
    torch.testing.assert_close(v.detach(), v_lora)  # the wrapper returns the trained model's velocity unchanged
    expected = (v_lora - v_base).pow(2).mean()
    torch.testing.assert_close(anchor.penalty(torch.device("cpu")).detach(), expected, rtol=1e-5, atol=1e-8)
    # after the call the adapters are on again: the next velocity is the LoRA model's
    with torch.no_grad():
        torch.testing.assert_close(velocity(x, 0.6), v_lora)


def test_penalty_gradient_pulls_the_lora_toward_the_base():
    bb = _lora()
    cond, x = _inputs(bb)
    anchor = BaseAnchor(bb, bb.bind(cond))
    anchor(x, 0.6)
    anchor(x, 0.3)
    before = float(anchor.penalty(torch.device("cpu")))
    anchor.penalty(torch.device("cpu")).backward()
    with torch.no_grad():
        for p in bb.trainable_parameters():
            if p.grad is not None:
                p -= 0.5 * p.grad
    after_anchor = BaseAnchor(bb, bb.bind(cond))
    with torch.enable_grad():
        after_anchor(x, 0.6)
        after_anchor(x, 0.3)
    assert float(after_anchor.penalty(torch.device("cpu"))) < before


def test_a_fresh_lora_has_zero_penalty_and_no_grad_calls_are_not_counted():
    bb = _lora(b_scale=0.0)
    cond, x = _inputs(bb)
    anchor = BaseAnchor(bb, bb.bind(cond))
    with torch.no_grad():
        anchor(x, 0.5)
    assert anchor.terms == []
    assert float(anchor.penalty(torch.device("cpu"))) == 0.0
    anchor(x, 0.5)
    assert float(anchor.penalty(torch.device("cpu"))) < 1e-10  # B = 0: the LoRA model is the base, to rounding


def test_adapters_come_back_on_when_the_block_raises():
    bb, x, velocity, v_lora = _moved_lora_at(0.6)
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="boom"), adapters_off(bb):
            raise RuntimeError("boom")
        torch.testing.assert_close(velocity(x, 0.6), v_lora)


def test_full_finetune_is_refused_with_the_field_named():
    bb = backbones.build("sd3", tiny=True, seed=0)
    bb.enable_full_finetune()
    with pytest.raises(ValueError, match=r"train.velocity_penalty needs backbone.finetune='lora'"):
        BaseAnchor(bb, bb.bind(bb.encode_prompts(PROMPTS)))
