"""The SD3 adapter with no VAE (latents are images in [-1, 1]) and a text encoder of one's own: the contract the
embedded backbone is built on."""

from __future__ import annotations

import torch

from flowbp_core import methods
from flowbp_core.backbones import LoRAConfig
from flowbp_core.backbones.sd3 import SD3Backbone
from flowbp_core.sampling import rollout


class BagOfBytes:
    """A text encoder that is not a transformers model: byte embeddings, mean-pooled."""

    def __init__(self, dim=32, pooled=64, length=8):
        g = torch.Generator().manual_seed(0)
        self.table = torch.randn(256, dim, generator=g)
        self.proj = torch.randn(dim, pooled, generator=g)
        self.length = length
        self.calls = 0

    def encode(self, prompts):
        self.calls += 1
        ids = torch.zeros(len(prompts), self.length, dtype=torch.long)
        for i, p in enumerate(prompts):
            b = list(p.encode())[: self.length]
            ids[i, : len(b)] = torch.tensor(b, dtype=torch.long)
        states = self.table[ids]
        return states, states.mean(1) @ self.proj


def _pixel_backbone():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    tr = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=3, out_channels=3, num_layers=1,
                               attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                               caption_projection_dim=16, pooled_projection_dim=64, pos_embed_max_size=16)
    return SD3Backbone(tr, None, BagOfBytes(), shift=1.0, height=16, width=16)


def test_pixel_space_backbone_samples_decodes_and_trains(tmp_path):
    bb = _pixel_backbone()
    assert bb.latent_shape(2) == (2, 3, 16, 16)
    z = torch.linspace(-2, 2, 3 * 16 * 16).view(1, 3, 16, 16)
    img = bb.decode(z)
    torch.testing.assert_close(img, (z * 0.5 + 0.5).clamp(0, 1))  # decode is the identity map to [0, 1]

    bb.apply_lora(LoRAConfig(rank=2))
    prompts = ["red", "blue"]
    cond = bb.encode_prompts(prompts)
    bb.encode_prompts(prompts)
    assert bb.text_encoder.calls == 2  # the prompts once, the empty negative prompt once; then the cache
    method = methods.build("flowbp_sparse", backbone="sd35", k=2)
    plan = method.plan(5, torch.Generator().manual_seed(0))
    noise = torch.randn(bb.latent_shape(2), generator=torch.Generator().manual_seed(1))
    cache = rollout(bb.bind(cond), noise, bb.schedule(5).sigmas, cond=cond, prompts=prompts,
                    needs=method.needs(plan, 5))
    ep = method.endpoint(cache.with_plan(plan), bb.bind(cache.cond))
    bb.decode(ep.value)[:, 0].mean().backward()
    assert all(p.grad is not None for p in bb.trainable_parameters())
    # the LoRA export still uses the SD3 pipeline's format, so diffusers users can load it into an SD3 model
    res = bb.export(tmp_path / "lora")
    assert res.kind == "lora" and res.pipeline_class == "StableDiffusion3Pipeline"
