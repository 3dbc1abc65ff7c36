"""OpenCLIP state dict -> transformers CLIPModel, by an explicit key mapping.

Why: HPSv2.1 ships as an OpenCLIP ViT-H-14 state dict (`HPS_v2.1_compressed.pt`), and open_clip needs torchvision,
which does not import beside this torch. The two layouts hold the same tensors:

| OpenCLIP                                              | transformers CLIPModel                                       |
|-------------------------------------------------------|--------------------------------------------------------------|
| visual.conv1.weight                                   | vision_model.embeddings.patch_embedding.weight               |
| visual.class_embedding                                | vision_model.embeddings.class_embedding                      |
| visual.positional_embedding                           | vision_model.embeddings.position_embedding.weight            |
| visual.ln_pre.{weight,bias}                           | vision_model.pre_layrnorm.*                                  |
| visual.transformer.resblocks.N.ln_1 / ln_2            | vision_model.encoder.layers.N.layer_norm1 / layer_norm2      |
| ...resblocks.N.attn.in_proj_{weight,bias} ([q;k;v])   | ...layers.N.self_attn.{q,k,v}_proj.{weight,bias}             |
| ...resblocks.N.attn.out_proj.*                        | ...layers.N.self_attn.out_proj.*                             |
| ...resblocks.N.mlp.c_fc.* / mlp.c_proj.*              | ...layers.N.mlp.fc1.* / mlp.fc2.*                            |
| visual.ln_post.*                                      | vision_model.post_layernorm.*                                |
| visual.proj  [width, embed]  (x @ proj)               | visual_projection.weight [embed, width] (transposed)         |
| token_embedding.weight                                | text_model.embeddings.token_embedding.weight                 |
| positional_embedding                                  | text_model.embeddings.position_embedding.weight              |
| transformer.resblocks.N.*                             | text_model.encoder.layers.N.* (as for the vision tower)      |
| ln_final.*                                            | text_model.final_layer_norm.*                                |
| text_projection [width, embed] (x @ proj)             | text_projection.weight [embed, width] (transposed)           |
| logit_scale                                           | logit_scale                                                  |

The architecture is read off the tensor shapes (widths, depths, patch and image size, context length, vocab,
embedding size); only the head counts and the activation are not in the weights (ViT-H-14: 16 and 16, exact
GELU - OpenCLIP's default, unlike OpenAI CLIP's quick_gelu).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from torch import Tensor

_BLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")

_BLOCK_PARTS = {
    "ln_1.weight": "layer_norm1.weight", "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight", "ln_2.bias": "layer_norm2.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight", "attn.out_proj.bias": "self_attn.out_proj.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight", "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight", "mlp.c_proj.bias": "mlp.fc2.bias",
}

_PLAIN = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
_TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
# Buffers OpenCLIP may save that have no counterpart (the causal mask is rebuilt by transformers).
_IGNORED = {"attn_mask"}


def read_openclip_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """Load an OpenCLIP checkpoint file: a bare state dict or {"state_dict": ...}, with or without `module.`."""
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected an OpenCLIP state dict (name -> tensor), got {type(obj).__name__}")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def openclip_to_hf(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename (and split / transpose) an OpenCLIP CLIP state dict into transformers CLIPModel names."""
    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    for k, v in sd.items():
        if k in _IGNORED:
            continue
        if k in _PLAIN:
            out[_PLAIN[k]] = v
            continue
        if k in _TRANSPOSED:
            out[_TRANSPOSED[k]] = v.t().contiguous()
            continue
        m = _BLOCK.match(k)
        if m is None:
            unknown.append(k)
            continue
        tower = "vision_model" if m.group(1) else "text_model"
        prefix = f"{tower}.encoder.layers.{m.group(2)}."
        part = m.group(3)
        if part in ("attn.in_proj_weight", "attn.in_proj_bias"):
            # nn.MultiheadAttention packs [q; k; v] along dim 0.
            q, kk, vv = v.chunk(3, dim=0)
            kind = "weight" if part.endswith("weight") else "bias"
            out[prefix + f"self_attn.q_proj.{kind}"] = q.contiguous()
            out[prefix + f"self_attn.k_proj.{kind}"] = kk.contiguous()
            out[prefix + f"self_attn.v_proj.{kind}"] = vv.contiguous()
        elif part in _BLOCK_PARTS:
            out[prefix + _BLOCK_PARTS[part]] = v
        else:
            unknown.append(k)
    if unknown:
        raise ValueError(f"OpenCLIP checkpoint has keys with no CLIPModel counterpart: {unknown[:8]}"
                         f"{' ...' if len(unknown) > 8 else ''} (is it a ViT CLIP with the standard text tower?)")
    return out


def _depth(sd: dict[str, Tensor], prefix: str) -> int:
    pat = re.compile(rf"^{re.escape(prefix)}transformer\.resblocks\.(\d+)\.")
    idx = {int(m.group(1)) for k in sd if (m := pat.match(k))}
    if not idx:
        raise ValueError(f"OpenCLIP checkpoint has no {prefix}transformer.resblocks.* keys")
    return max(idx) + 1


def clip_config_from_openclip(sd: dict[str, Tensor], *, vision_heads: int = 16, text_heads: int = 16,
                              hidden_act: str = "gelu", eos_token_id: int | None = None, pad_token_id: int = 0):
    """A transformers CLIPConfig matching the OpenCLIP state dict's shapes (defaults: ViT-H-14's head counts)."""
    from transformers import CLIPConfig

    for key in ("visual.conv1.weight", "visual.positional_embedding", "visual.proj", "token_embedding.weight",
                "positional_embedding", "text_projection"):
        if key not in sd:
            raise ValueError(f"OpenCLIP checkpoint lacks {key!r}: not a ViT CLIP state dict")
    v_width, _, patch, _ = sd["visual.conv1.weight"].shape
    n_pos = sd["visual.positional_embedding"].shape[0]
    grid = math.isqrt(n_pos - 1)
    if grid * grid != n_pos - 1:
        raise ValueError(f"visual.positional_embedding has {n_pos} rows: not 1 + a square grid")
    vocab, t_width = sd["token_embedding.weight"].shape
    ctx = sd["positional_embedding"].shape[0]
    embed = sd["text_projection"].shape[1]
    if sd["visual.proj"].shape != (v_width, embed):
        raise ValueError(f"visual.proj {tuple(sd['visual.proj'].shape)} != ({v_width}, {embed})")
    v_mlp = sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    t_mlp = sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    for width, heads, tower in ((v_width, vision_heads, "vision"), (t_width, text_heads, "text")):
        if width % heads:
            raise ValueError(f"{tower}_heads={heads} does not divide the {tower} width {width}")
    eos = vocab - 1 if eos_token_id is None else eos_token_id  # OpenCLIP's end-of-text is the last token id
    text_cfg = dict(vocab_size=vocab, hidden_size=t_width, intermediate_size=t_mlp,
                    num_hidden_layers=_depth(sd, ""), num_attention_heads=text_heads, max_position_embeddings=ctx,
                    hidden_act=hidden_act, projection_dim=embed, eos_token_id=eos, bos_token_id=eos - 1,
                    pad_token_id=pad_token_id, layer_norm_eps=1e-5)
    vision_cfg = dict(hidden_size=v_width, intermediate_size=v_mlp, num_hidden_layers=_depth(sd, "visual."),
                      num_attention_heads=vision_heads, image_size=grid * patch, patch_size=patch,
                      hidden_act=hidden_act, projection_dim=embed, layer_norm_eps=1e-5)
    return CLIPConfig(text_config=text_cfg, vision_config=vision_cfg, projection_dim=embed)


def load_openclip_as_hf(path: str | Path, **config_kwargs):
    """CLIPModel (random init skipped) holding an OpenCLIP checkpoint's weights; strict: every tensor used."""
    from transformers import CLIPModel

    sd = read_openclip_checkpoint(path)
    config = clip_config_from_openclip(sd, **config_kwargs)
    with torch.device("meta"):
        model = CLIPModel(config)
    hf = openclip_to_hf(sd)
    missing = set(model.state_dict()) - set(hf)
    # position_ids are non-persistent buffers in recent transformers; tolerate them if present.
    missing = {m for m in missing if not m.endswith("position_ids")}
    extra = set(hf) - set(model.state_dict())
    if missing or extra:
        raise ValueError(f"{path}: after mapping, missing {sorted(missing)[:6]}, unexpected {sorted(extra)[:6]}")
    model.load_state_dict(hf, strict=False, assign=True)
    return rebuild_position_ids(model)


def rebuild_position_ids(model):
    """A model built on the meta device and filled with `load_state_dict(assign=True)` still has its
    non-persistent `position_ids` buffers on meta: rebuild them (they are aranges) on the CPU."""
    for name, buf in list(model.named_buffers()):
        if buf.is_meta:
            mod_name, _, attr = name.rpartition(".")
            if not attr.endswith("position_ids"):
                raise ValueError(f"buffer {name!r} was not loaded from the checkpoint")
            setattr(model.get_submodule(mod_name), attr, torch.arange(buf.shape[-1]).expand(buf.shape).clone())
    return model
