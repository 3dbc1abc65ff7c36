"""Each tiny family against diffusers' own pipeline: same prompt embeddings, same sampled latents, same image.

This is the test that the adapters' conventions (timestep scale, packing, ids, guidance, shift, VAE scaling,
FLUX.2's batch-norm statistics) are the model's, not our guess at them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flowbp_core import backbones
from flowbp_core.backbones.base import Backbone
from flowbp_core.errors import ConfigError
from flowbp_core.guidance import GuidanceConfig
from flowbp_core.sampling import rollout
FAMILIES = ("sd3", "flux1", "flux2")
PROMPTS = ["a red cube", "two blue spheres"]
N = 3


def _pipeline_images(bb, noise, output_type):
    """Sample with the diffusers pipeline from the same noise and base sigmas; returns its latents or images."""
    from flowbp_core.backbones.flux1 import pack, unpack

    pipe = bb.pipeline()
    kw = dict(num_inference_steps=N, output_type=output_type, sigmas=list(np.linspace(1.0, 1 / N, N)),
              guidance_scale=bb.preset.guidance.scale, max_sequence_length=bb.text_encoder.max_sequence_length)
    if bb.name == "sd3":
        return pipe(PROMPTS, latents=noise, **kw).images
    if bb.name == "flux1":
        out = pipe(PROMPTS, latents=pack(noise), height=bb.height, width=bb.width, **kw).images
        return unpack(out, *noise.shape[-2:]) if output_type == "latent" else out
    return pipe(prompt=PROMPTS, latents=noise, height=bb.height, width=bb.width, **kw).images


def _to_pipeline_latent_space(bb, z):
    """FLUX.2's pipeline returns un-normalised, unpatchified latents; ours stay in the model's space."""
    if bb.name != "flux2":
        return z
    from flowbp_core.backbones.flux2 import bn_stats, unpatchify

    mean, std = bn_stats(bb.vae)
    return unpatchify(z * std + mean)


@pytest.mark.parametrize("name", FAMILIES)
def test_is_a_backbone_with_paper_preset(name, tiny_cache):
    bb = tiny_cache(name)
    assert isinstance(bb, Backbone)
    assert bb.preset.method_preset == {"sd3": "sd35", "flux1": "flux1", "flux2": "flux2"}[name]
    assert bb.preset.n_steps == 25
    want = {"sd3": GuidanceConfig("true", 3.5), "flux1": GuidanceConfig("distilled", 4.0),
            "flux2": GuidanceConfig("true", 4.0)}[name]
    assert bb.preset.guidance == want


@pytest.mark.parametrize("name", FAMILIES)
def test_prompt_embeddings_match_the_pipeline_and_are_cached(name, tiny_cache):
    bb = tiny_cache(name)
    pipe = bb.pipeline()
    cond = bb.encode_prompts(PROMPTS)
    if name == "sd3":
        pe, npe, pp, npp = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=True,
                                              max_sequence_length=bb.text_encoder.max_sequence_length)
        pairs = [(pe, cond["prompt_embeds"]), (pp, cond["pooled"]), (npe[:1], cond["neg_prompt_embeds"]),
                 (npp[:1], cond["neg_pooled"])]
    elif name == "flux1":
        pe, pp, _ = pipe.encode_prompt(PROMPTS, None, max_sequence_length=bb.text_encoder.max_sequence_length)
        pairs = [(pe, cond["prompt_embeds"]), (pp, cond["pooled"])]
        assert "neg_prompt_embeds" not in cond  # distilled guidance has no negative branch
    else:
        pe, _ = pipe.encode_prompt(PROMPTS, max_sequence_length=bb.text_encoder.max_sequence_length)
        npe, _ = pipe.encode_prompt([""], max_sequence_length=bb.text_encoder.max_sequence_length)
        pairs = [(pe, cond["prompt_embeds"]), (npe, cond["neg_prompt_embeds"])]
    for ref, ours in pairs:
        assert ref.shape == ours.shape
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)

    calls = []
    orig = bb.text_encoder.encode
    bb.text_encoder.encode = lambda p: (calls.append(list(p)), orig(p))[1]
    try:
        again = bb.encode_prompts([PROMPTS[1], "a new prompt", PROMPTS[0]])
    finally:
        del bb.text_encoder.encode
    assert calls == [["a new prompt"]]  # only the unseen prompt reaches the text encoder
    torch.testing.assert_close(again["prompt_embeds"][0], cond["prompt_embeds"][1])


@pytest.mark.parametrize("name", FAMILIES)
def test_rollout_matches_the_diffusers_pipeline(name, tiny_cache):
    bb = tiny_cache(name)
    noise = torch.randn(bb.latent_shape(2), generator=torch.Generator().manual_seed(1))
    cond = bb.encode_prompts(PROMPTS)
    sched = bb.schedule(N)
    cache = rollout(bb.bind(cond), noise, sched.sigmas, cond=cond, prompts=PROMPTS)
    ref_latents = _pipeline_images(bb, noise, "latent")
    torch.testing.assert_close(_to_pipeline_latent_space(bb, cache.final), ref_latents, rtol=1e-4, atol=2e-5)
    ref_images = _pipeline_images(bb, noise, "pt")
    ours = bb.decode(cache.final)
    assert ours.shape == (2, 3, bb.height, bb.width) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref_images, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_decode_is_differentiable(name, tiny_cache):
    bb = tiny_cache(name)
    z = (0.3 * torch.randn(bb.latent_shape(1), generator=torch.Generator().manual_seed(2))).requires_grad_(True)
    img = bb.decode(z)
    assert float(img.detach().min()) >= 0.0 and float(img.detach().max()) <= 1.0
    img.mean().backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_schedules_follow_each_family():
    from flowbp_core.schedules import flux1_mu, flux2_empirical_mu

    sd3 = backbones.build("sd3", tiny=True)
    s = sd3.schedule(25)
    assert s.timestep_scale == 1000.0 and abs(float(s.sigmas[18]) - 0.539) < 1e-3  # algorithms.md example
    flux1 = backbones.get("flux1")
    assert flux1.__name__ == "Flux1Backbone"
    # the real 512 px FLUX.1 sequence: 1024 packed tokens -> mu = 0.63
    assert abs(flux1_mu(1024) - 0.63) < 1e-2
    assert abs(flux2_empirical_mu(1024, 25) - flux2_empirical_mu(1024, 50)) > 0  # depends on N too


@pytest.mark.parametrize("name", FAMILIES)
def test_image_size_and_batch_tiling(name, tiny_cache):
    bb = backbones.build(name, tiny=True, height=48, width=32)
    assert bb.decode(torch.zeros(bb.latent_shape(1))).shape == (1, 3, 48, 32)
    with pytest.raises(ConfigError, match="backbone.height"):
        bb.set_image_size(30, 32)
    # a state batch that is a multiple of the prompt batch reuses prompt b % B (DRaFT-LV style repeats)
    cond = bb.encode_prompts(PROMPTS)
    x = torch.randn(bb.latent_shape(2), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        v2 = bb.velocity(x, 0.5, cond)
        v4 = bb.velocity(torch.cat([x, x]), 0.5, cond)
    torch.testing.assert_close(v4, torch.cat([v2, v2]), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="batch"):
        bb.velocity(torch.randn(bb.latent_shape(3)), 0.5, cond)


def test_distilled_guidance_is_refused_where_the_model_has_no_embedding(tiny_cache):
    bb = tiny_cache("sd3")
    cond = bb.encode_prompts(PROMPTS)
    with pytest.raises(ConfigError, match="guidance.mode"):
        bb.velocity(torch.zeros(bb.latent_shape(2)), 0.5, cond, GuidanceConfig("distilled", 4.0))


def test_bf16_backbone_keeps_lora_weights_in_float32():
    bb = backbones.build("sd3", tiny=True, dtype="bf16")
    bb.apply_lora(backbones.LoRAConfig(rank=2))
    assert bb.dtype == torch.bfloat16
    assert {p.dtype for p in bb.trainable_parameters()} == {torch.float32}
    cond = bb.encode_prompts(PROMPTS[:1])
    x = torch.randn(bb.latent_shape(1))
    v = bb.velocity(x, 0.7, cond)
    assert v.dtype == x.dtype and torch.isfinite(v).all()
    v.float().pow(2).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in bb.trainable_parameters())


@pytest.mark.parametrize("name", ["sd3", "flux2"])
def test_batched_cfg_rollout_equals_two_forwards(name, tiny_cache):
    bb = tiny_cache(name)
    cond = bb.encode_prompts(PROMPTS)
    x = torch.randn(bb.latent_shape(2), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        batched = bb.velocity(x, 0.8, cond)
        bb.batch_cfg = False
        try:
            separate = bb.velocity(x, 0.8, cond)
        finally:
            bb.batch_cfg = True
    torch.testing.assert_close(batched, separate, rtol=1e-5, atol=1e-5)
