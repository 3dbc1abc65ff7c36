"""The loaders' shape inference on the REAL architectures (tensors on the meta device: no memory, no weights):
HPSv2.1's OpenCLIP ViT-H-14 and ImageReward's BLIP ViT-L/16 + BERT-base."""

from __future__ import annotations

import torch

from flowbp_core.rewards.blip_convert import blip_configs
from flowbp_core.rewards.openclip_convert import clip_config_from_openclip


def meta(*shape):
    return torch.empty(*shape, device="meta")


def vit_h14_openclip() -> dict[str, torch.Tensor]:
    sd = {"visual.conv1.weight": meta(1280, 3, 14, 14), "visual.class_embedding": meta(1280),
          "visual.positional_embedding": meta(257, 1280), "visual.proj": meta(1280, 1024),
          "token_embedding.weight": meta(49408, 1024), "positional_embedding": meta(77, 1024),
          "text_projection": meta(1024, 1024), "logit_scale": meta(())}
    for i in range(32):
        sd[f"visual.transformer.resblocks.{i}.mlp.c_fc.weight"] = meta(5120, 1280)
    for i in range(24):
        sd[f"transformer.resblocks.{i}.mlp.c_fc.weight"] = meta(4096, 1024)
    return sd


def test_vit_h14_config_is_inferred():
    from transformers import CLIPModel

    cfg = clip_config_from_openclip(vit_h14_openclip())
    v, t = cfg.vision_config, cfg.text_config
    assert (v.image_size, v.patch_size, v.hidden_size, v.num_hidden_layers, v.intermediate_size) == \
        (224, 14, 1280, 32, 5120)
    assert (t.vocab_size, t.max_position_embeddings, t.hidden_size, t.num_hidden_layers, t.eos_token_id) == \
        (49408, 77, 1024, 24, 49407)
    assert cfg.projection_dim == 1024 and v.hidden_act == t.hidden_act == "gelu"
    with torch.device("meta"):
        n = sum(p.numel() for p in CLIPModel(cfg).parameters())
    assert 0.98e9 < n < 0.99e9  # OpenCLIP ViT-H-14: 986M parameters


def test_blip_large_config_is_inferred():
    vision = {"embeddings.patch_embedding.weight": meta(1024, 3, 16, 16),
              "embeddings.position_embedding": meta(1, 197, 1024)}
    for i in range(24):
        vision[f"encoder.layers.{i}.mlp.fc1.weight"] = meta(4096, 1024)
    text = {"embeddings.word_embeddings.weight": meta(30524, 768),
            "embeddings.position_embeddings.weight": meta(512, 768)}
    for i in range(12):
        text[f"encoder.layer.{i}.intermediate.dense.weight"] = meta(3072, 768)
        text[f"encoder.layer.{i}.crossattention.self.key.weight"] = meta(768, 1024)
    vcfg, tcfg = blip_configs(vision, text)
    assert (vcfg.image_size, vcfg.patch_size, vcfg.num_hidden_layers, vcfg.num_attention_heads) == (224, 16, 24, 16)
    assert (tcfg.vocab_size, tcfg.num_hidden_layers, tcfg.encoder_hidden_size, tcfg.is_decoder) == \
        (30524, 12, 1024, True)
