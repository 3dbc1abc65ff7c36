"""The released ImageReward checkpoint (`ImageReward.pt`, the original BLIP code's names) -> transformers' BLIP
classes, by an explicit key mapping.

`ImageReward.pt` holds `blip.visual_encoder.*` (a timm-style ViT-L/16), `blip.text_encoder.*` (BLIP's "med" BERT
with cross-attention), `mlp.layers.*` (the head) and a few tensors we do not use (`blip.vision_proj`,
`blip.text_proj`, ...). The vision tower is renamed:

| ImageReward / BLIP                           | transformers BlipVisionModel                        |
|----------------------------------------------|-----------------------------------------------------|
| visual_encoder.cls_token [1,1,D]             | embeddings.class_embedding                          |
| visual_encoder.pos_embed [1,1+N,D]           | embeddings.position_embedding                       |
| visual_encoder.patch_embed.proj.*            | embeddings.patch_embedding.*                        |
| visual_encoder.blocks.N.norm1 / norm2        | encoder.layers.N.layer_norm1 / layer_norm2          |
| visual_encoder.blocks.N.attn.qkv.*           | encoder.layers.N.self_attn.qkv.* (same [q;k;v] packing) |
| visual_encoder.blocks.N.attn.proj.*          | encoder.layers.N.self_attn.projection.*             |
| visual_encoder.blocks.N.mlp.fc1 / fc2        | encoder.layers.N.mlp.fc1 / fc2                      |
| visual_encoder.norm.*                        | post_layernorm.*                                    |

The text encoder keeps its names (transformers' BlipTextModel was written from the same BERT code):
`text_encoder.embeddings.{word,position}_embeddings`, `...encoder.layer.N.{attention,crossattention}.*`, etc.
Sizes are read off the tensors; head counts (ViT-L 16, BERT-base 12) are not in the weights. Layer-norm eps as
the original code: 1e-6 in the ViT (timm), 1e-12 in BERT.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from torch import Tensor

_VIS_PLAIN = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
              "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
              "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
              "norm.weight": "post_layernorm.weight", "norm.bias": "post_layernorm.bias"}
_VIS_BLOCK = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv",
              "attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$")


def read_imagereward_checkpoint(path: str | Path) -> dict[str, Tensor]:
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or "blip.visual_encoder.cls_token" not in obj:
        raise ValueError(f"{path}: expected ImageReward.pt (keys blip.visual_encoder.*, blip.text_encoder.*, "
                         "mlp.layers.*)")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def split_imagereward(sd: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
    """(BlipVisionModel state dict, BlipTextModel state dict, MLP head state dict) in transformers' names."""
    vision, text, head, unknown = {}, {}, {}, []
    for k, v in sd.items():
        if k.startswith("blip.visual_encoder."):
            name = k.removeprefix("blip.visual_encoder.")
            if name in _VIS_PLAIN:
                vision[_VIS_PLAIN[name]] = v
            elif (m := _BLOCK_RE.match(name)) and m.group(2) in _VIS_BLOCK:
                vision[f"encoder.layers.{m.group(1)}.{_VIS_BLOCK[m.group(2)]}.{m.group(3)}"] = v
            else:
                unknown.append(k)
        elif k.startswith("blip.text_encoder."):
            name = k.removeprefix("blip.text_encoder.")
            if not (name.endswith("position_ids") or name.startswith("pooler.")):
                text[name] = v
        elif k.startswith("mlp.layers."):
            head[k.removeprefix("mlp.")] = v
    if unknown:
        raise ValueError(f"ImageReward checkpoint: vision keys with no BlipVisionModel counterpart: {unknown[:6]}")
    return vision, text, head


def blip_configs(vision: dict[str, Tensor], text: dict[str, Tensor], *, vision_heads: int = 16,
                 text_heads: int = 12):
    from transformers import BlipTextConfig, BlipVisionConfig

    width, _, patch, _ = vision["embeddings.patch_embedding.weight"].shape
    n_pos = vision["embeddings.position_embedding"].shape[1]
    grid = math.isqrt(n_pos - 1)
    if grid * grid != n_pos - 1:
        raise ValueError(f"visual_encoder.pos_embed has {n_pos} positions: not 1 + a square grid")
    depth = 1 + max(int(k.split(".")[2]) for k in vision if k.startswith("encoder.layers."))
    vcfg = BlipVisionConfig(hidden_size=width, intermediate_size=vision["encoder.layers.0.mlp.fc1.weight"].shape[0],
                            num_hidden_layers=depth, num_attention_heads=vision_heads, image_size=grid * patch,
                            patch_size=patch, layer_norm_eps=1e-6, hidden_act="gelu")
    vocab, hidden = text["embeddings.word_embeddings.weight"].shape
    t_depth = 1 + max(int(k.split(".")[2]) for k in text if k.startswith("encoder.layer."))
    tcfg = BlipTextConfig(vocab_size=vocab, hidden_size=hidden,
                          intermediate_size=text["encoder.layer.0.intermediate.dense.weight"].shape[0],
                          num_hidden_layers=t_depth, num_attention_heads=text_heads,
                          encoder_hidden_size=text["encoder.layer.0.crossattention.self.key.weight"].shape[1],
                          max_position_embeddings=text["embeddings.position_embeddings.weight"].shape[0],
                          layer_norm_eps=1e-12, hidden_act="gelu", is_decoder=True)
    for w, h, tower in ((width, vision_heads, "vision"), (hidden, text_heads, "text")):
        if w % h:
            raise ValueError(f"{tower}_heads={h} does not divide the {tower} width {w}")
    return vcfg, tcfg


def load_imagereward_towers(path: str | Path, *, vision_heads: int = 16, text_heads: int = 12):
    """(BlipVisionModel, BlipTextModel, head state dict) holding ImageReward.pt's weights; every tensor used."""
    from transformers import BlipTextModel, BlipVisionModel

    from flowbp_core.rewards.openclip_convert import rebuild_position_ids

    vision_sd, text_sd, head_sd = split_imagereward(read_imagereward_checkpoint(path))
    vcfg, tcfg = blip_configs(vision_sd, text_sd, vision_heads=vision_heads, text_heads=text_heads)
    with torch.device("meta"):
        vision = BlipVisionModel(vcfg)
        text = BlipTextModel(tcfg, add_pooling_layer=False)
    for model, sd, what in ((vision, vision_sd, "vision"), (text, text_sd, "text")):
        want = {k for k in model.state_dict() if not k.endswith("position_ids")}
        missing, extra = sorted(want - set(sd)), sorted(set(sd) - want)
        if missing or extra:
            raise ValueError(f"{path}: {what} tower after mapping: missing {missing[:6]}, unexpected {extra[:6]}")
        model.load_state_dict(sd, strict=False, assign=True)
        rebuild_position_ids(model)
    return vision, text, head_sd
