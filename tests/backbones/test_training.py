"""A learner step on every tiny family with the FlowBP methods, LoRA and full; weight sync; checkpointing."""

from __future__ import annotations

import pytest
import torch

from flowbp_core import backbones, methods
from flowbp_core.backbones import LoRAConfig
from flowbp_core.errors import ConfigError
from flowbp_core.sampling import rollout

FAMILIES = ("sd3", "flux1", "flux2")
PROMPTS = ["a red cube", "two blue spheres"]
N = 6


def _fresh(name: str, mode: str, seed: int = 0):
    bb = backbones.build(name, tiny=True, seed=seed)
    if mode == "lora":
        bb.apply_lora(LoRAConfig(rank=2))
        with torch.no_grad():  # B starts at 0; give it values so the adapter changes the output
            for n, p in bb.transformer.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    else:
        bb.enable_full_finetune()
    return bb


def _step(bb, method_name: str):
    method = methods.build(method_name, backbone=bb.preset.method_preset)
    plan = method.plan(N, torch.Generator().manual_seed(0))
    cond = bb.encode_prompts(PROMPTS)
    noise = torch.randn(bb.latent_shape(2), generator=torch.Generator().manual_seed(4))
    cache = rollout(bb.bind(cond), noise, bb.schedule(N).sigmas, cond=cond, prompts=PROMPTS,
                    needs=method.needs(plan, N))
    ep = method.endpoint(cache.with_plan(plan), bb.bind(cache.cond))
    img = bb.decode(ep.value)
    reward = img[:, 0].mean(dim=(1, 2)) - img[:, 2].mean(dim=(1, 2))  # "redness": a differentiable stand-in
    loss = -(ep.weights.to(reward) * reward).mean()
    loss.backward()
    return cache, ep


@pytest.mark.parametrize("mode", ["lora", "full"])
@pytest.mark.parametrize("name", FAMILIES)
def test_flowbp_steps_reach_the_trainable_weights(name, mode):
    bb = _fresh(name, mode)
    params = bb.trainable_parameters()
    names = set(bb.trainable_state_dict())
    if mode == "lora":
        assert names and all("lora_" in n for n in names)
        assert bb.finetune_mode == "lora"
    else:
        assert len(params) == len(list(bb.transformer.parameters()))
    for method_name in ("flowbp_sparse", "flowbp_bridge", "flowbp_lagrange"):
        for p in params:
            p.grad = None
        cache, ep = _step(bb, method_name)
        # the straight-through pin: the reward sees the true sample exactly
        assert torch.equal(ep.value.detach().to(cache.final.dtype), cache.final), method_name
        grads = [p.grad for p in params if p.grad is not None]
        assert grads, f"{method_name}: no gradient reached the {mode} weights"
        assert all(torch.isfinite(g).all() for g in grads)
        assert sum(float(g.abs().sum()) for g in grads) > 0
    assert all(not p.requires_grad for p in bb.vae.parameters())


@pytest.mark.parametrize("name", FAMILIES)
def test_weight_sync_makes_a_second_copy_identical(name):
    learner, worker = _fresh(name, "lora", seed=0), backbones.build(name, tiny=True, seed=0)
    worker.apply_lora(LoRAConfig(rank=2))
    cond = learner.encode_prompts(PROMPTS)
    x = torch.randn(learner.latent_shape(2), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        before = worker.velocity(x, 0.6, cond)
        worker.load_trainable_state_dict({k: v.clone() for k, v in learner.trainable_state_dict().items()})
        after, ref = worker.velocity(x, 0.6, cond), learner.velocity(x, 0.6, cond)
    assert not torch.allclose(before, ref)
    torch.testing.assert_close(after, ref, rtol=0, atol=0)


def test_load_trainable_state_dict_names_what_differs():
    bb = _fresh("sd3", "lora")
    sd = dict(bb.trainable_state_dict())
    key = next(iter(sd))
    with pytest.raises(ValueError, match="missing"):
        bb.load_trainable_state_dict({k: v for k, v in sd.items() if k != key})
    with pytest.raises(ValueError, match="shape"):
        bb.load_trainable_state_dict({**sd, key: torch.zeros(1)})


def test_lora_config_is_checked():
    with pytest.raises(ConfigError, match="lora.rank"):
        LoRAConfig(rank=0)
    bb = backbones.build("flux1", tiny=True)
    with pytest.raises(ConfigError, match="lora.target_modules"):
        bb.apply_lora(LoRAConfig(rank=2, target_modules=("no_such_layer",)))


@pytest.mark.parametrize("name", FAMILIES)
def test_gradient_checkpointing_gives_the_same_gradient(name):
    grads = []
    for ckpt in (False, True):
        bb = _fresh(name, "lora")
        if ckpt:
            bb.enable_gradient_checkpointing()
        cond = bb.encode_prompts(PROMPTS[:1])
        x = torch.randn(bb.latent_shape(1), generator=torch.Generator().manual_seed(6))
        bb.velocity(x, 0.4, cond).pow(2).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in bb.trainable_parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)
