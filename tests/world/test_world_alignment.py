"""The world reward and the embedded backbone in the training loop: the reward reads attributes, is
differentiable, and two FlowBP-Sparse steps on a batch raise the reward on that batch."""

import numpy as np
import pytest
import torch

from flowbp_core import backbones, rewards
from flowbp_core.world.data import prompt_pool
from flowbp_core.world.scenes import render_batch, sample_scene


@pytest.fixture(scope="module")
def reward():
    return rewards.build("world_attributes")


def test_reward_is_registered_and_prefers_matching_prompts(reward):
    assert "world_attributes" in rewards.names()
    rng = np.random.default_rng(0)
    pool = prompt_pool("heldout", 48, seed=4)
    images = torch.from_numpy(render_batch([sample_scene(p.spec, rng) for p in pool]))
    right = reward(images, [p.text for p in pool])
    wrong = reward(images, [pool[(i + 5) % len(pool)].text for i in range(len(pool))])
    assert right.shape == (48,) and bool((right <= 0).all())
    assert float(right.mean()) > -0.5 and float(right.mean()) > float(wrong.mean()) + 1.0


def test_reward_is_differentiable_in_the_images(reward):
    rng = np.random.default_rng(1)
    pool = prompt_pool("train", 4, seed=5)
    images = torch.from_numpy(render_batch([sample_scene(p.spec, rng) for p in pool])).requires_grad_(True)
    r = rewards.build("world_attributes", aesthetic_weight=0.5)(images, [p.text for p in pool])
    r.sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="aesthetic_weight"):
        rewards.build("world_attributes", aesthetic_weight=-1)


def test_smoothed_reward_is_the_noise_average_repeatable_and_differentiable(reward):
    rng = np.random.default_rng(2)
    pool = prompt_pool("heldout", 6, seed=6)
    prompts = [p.text for p in pool]
    images = torch.from_numpy(render_batch([sample_scene(p.spec, rng) for p in pool])).requires_grad_(True)
    smooth = rewards.build("world_attributes", smoothing_sigma=0.1, smoothing_samples=3)
    r1, r2 = smooth(images, prompts), smooth(images, prompts)
    assert torch.equal(r1, r2)  # seeded by the images: a resumed run sees the same reward
    plain = reward(images, prompts)
    assert not torch.equal(r1, plain) and float((r1 - plain).abs().max().detach()) < 0.5  # GT renders survive sigma 0.1
    r1.sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    for bad in ({"smoothing_sigma": 0.9}, {"smoothing_sigma": 0.1, "smoothing_samples": 0}):
        with pytest.raises(ValueError, match="smoothing"):
            rewards.build("world_attributes", **bad)


def test_contrastive_reward_prefers_the_right_prompt_among_same_task_negatives():
    rng = np.random.default_rng(3)
    pool = prompt_pool("heldout", 12, seed=7)
    prompts = [p.text for p in pool]
    images = torch.from_numpy(render_batch([sample_scene(p.spec, rng) for p in pool]))
    contrastive = rewards.build("world_attributes", contrastive_negatives=48)
    right = contrastive(images, prompts)
    wrong = contrastive(images, prompts[3:] + prompts[:3])
    assert bool((right <= 0).all()) and float(right.mean()) > float(wrong.mean()) + 1.0
    # the negatives are same-task prompts: "a circle" is not penalised because "a red circle" also holds
    assert set(contrastive.negatives) == {"single_object", "two_objects", "counting", "colours", "position",
                                          "colour_attr"}
    with pytest.raises(ValueError, match="contrastive_negatives"):
        rewards.build("world_attributes", contrastive_negatives=-1)


def test_embedded_backbone_is_registered_and_samples_the_base_model():
    bb = backbones.build("embedded")
    assert bb.name == "embedded" and bb.latent_shape(2) == (2, 3, 32, 32) and bb.vae is None
    cond = bb.encode_prompts(["a red circle", "two blue squares"])
    assert cond["prompt_embeds"].shape == (2, 16, 384) and cond["pooled"].shape == (2, 384)
    v = bb.velocity(torch.randn(2, 3, 32, 32), 0.5, cond)
    assert v.shape == (2, 3, 32, 32) and torch.isfinite(v).all()


def test_two_step_alignment_raises_the_reward_on_its_batch(reward):
    from flowbp_core.config import (BackboneSpec, LoRASpec, MethodSpec, PromptSource, RewardSpec, RunConfig,
                                    SamplingSpec, TrainSpec)
    from flowbp_core.run import build_components, make_optimizer, rollout_for
    from flowbp_core.step import learn_step

    torch.manual_seed(0)
    prompts = [p.text for p in prompt_pool("train", 4, seed=21, tasks=("colours", "position"))]
    cfg = RunConfig(backbone=BackboneSpec(name="embedded", device="cpu", lora=LoRASpec(rank=4)),
                    method=MethodSpec(name="flowbp_sparse", preset="sd35", k=3), reward=RewardSpec(loss="neg_mean"),
                    sampling=SamplingSpec(n_steps=6),
                    train=TrainSpec(steps=2, batch_size=4, lr=3e-3, prompts=PromptSource(prompts=prompts)))
    comp = build_components(cfg, with_reward=False)
    comp.reward = reward
    opt = make_optimizer(cfg, comp.backbone.trainable_parameters())

    def batch_reward() -> float:
        cache = rollout_for(comp, 0, 0, prompts=prompts)
        with torch.no_grad():
            return float(reward(comp.backbone.decode(cache.final), prompts).mean())

    before = batch_reward()
    for step in range(2):
        res = learn_step(rollout_for(comp, step, step, prompts=prompts), comp, step=step, optimizer=opt)
        assert not res.skipped and res.grad_norm > 0
    after = batch_reward()
    assert after > before, (before, after)


def test_gradient_blur_keeps_the_reward_and_low_passes_its_pixel_gradient(reward):
    from flowbp_core.world.recogniser import gaussian_blur

    rng = np.random.default_rng(4)
    pool = prompt_pool("heldout", 6, seed=8)
    prompts = [p.text for p in pool]
    base = torch.from_numpy(render_batch([sample_scene(p.spec, rng) for p in pool]))
    plain_x, blur_x = base.clone().requires_grad_(True), base.clone().requires_grad_(True)
    plain = reward(plain_x, prompts)
    lowpass = rewards.build("world_attributes", gradient_blur=1.5)
    blurred = lowpass(blur_x, prompts)
    assert torch.allclose(plain, blurred, atol=1e-5)  # the recogniser reads the true pixels
    plain.sum().backward()
    blurred.sum().backward()
    # the gradient is the blur's adjoint applied to the plain gradient (the symmetric kernel is its own adjoint
    # away from the reflect-padded border)
    want = gaussian_blur(plain_x.grad, 1.5)
    inner = (slice(None), slice(None), slice(6, -6), slice(6, -6))
    assert torch.allclose(blur_x.grad[inner], want[inner], atol=1e-4 * float(want.abs().max()))

    def patch_period_energy(g):  # the 4-px-period part of the gradient: what paints a patch grid
        f = torch.fft.rfft2(g).abs()
        return float(f[..., 8, :].sum() + f[..., :, 8].sum())

    assert patch_period_energy(blur_x.grad) < 0.2 * patch_period_energy(plain_x.grad)
    with pytest.raises(ValueError, match="gradient_blur"):
        rewards.build("world_attributes", gradient_blur=5.0)
