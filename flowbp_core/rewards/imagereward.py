"""ImageReward (Xu et al. 2023): BLIP image-grounded text encoder + an MLP head, built on transformers' BLIP
classes (the `image-reward` package is not needed; it pins old transformers and needs torchvision).

Score, as ImageReward's own `score_gard`: image tokens from the BLIP ViT (last hidden state, all tokens); the
prompt (BERT tokens, padded to 35) through the BLIP text encoder with cross-attention to them (bidirectional,
the [CLS] token first, no [ENC] substitution); the [CLS] feature through the MLP; then (r - 0.16717) / 1.03334.
Preprocessing as its `_transform`: shortest side 224 bicubic, center crop, CLIP mean/std (not BLIP's 384 stretch).

Weights, either: `checkpoint` = the released `ImageReward.pt` (mapped into transformers' BLIP classes by
blip_convert.py) with `tokenizer` = a bert-base-uncased tokenizer folder; or `path` = a local transformers folder
of a BlipForImageTextRetrieval (model_type "blip": `vision_model.*`, `text_encoder.*`) with `head` = the MLP
state dict (`layers.0/2/4/6/7`, the aesthetic layout with 768 inputs) or an `ImageReward.pt` holding
`mlp.layers.*`. An optional extra: nothing else in the project needs BLIP.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from flowbp_core.dtypes import resolve_dtype
from flowbp_core.rewards.aesthetic import AestheticMLP
from flowbp_core.rewards.base import FrozenReward, check_batch, register, require_dir, require_file
from flowbp_core.rewards.clip_family import check_model_type, load_tokenizer
from flowbp_core.rewards.preprocess import ImagePipeline

# Normalisation constants of the released ImageReward-v1.0 head.
IR_MEAN = 0.16717362830052426
IR_STD = 1.0333394966054072
MAX_PROMPT_TOKENS = 35


def load_ir_head(path: str | Path) -> AestheticMLP:
    p = require_file(path, "imagereward head (ImageReward.pt, or a state dict of its MLP)")
    sd = torch.load(str(p), map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd:
        sd = sd["state_dict"]
    if any(k.startswith("mlp.layers.") for k in sd):
        sd = {k.removeprefix("mlp."): v for k, v in sd.items() if k.startswith("mlp.layers.")}
    if "layers.0.weight" not in sd:
        raise ValueError(f"{p}: expected ImageReward's MLP (mlp.layers.0.weight ... or layers.0.weight ...), "
                         f"got keys {sorted(sd)[:6]}")
    head = AestheticMLP(input_size=sd["layers.0.weight"].shape[1])
    head.load_state_dict(sd, strict=True)
    return head


class ImageRewardModel(FrozenReward):
    """BLIP vision tower + BLIP text encoder (cross-attention) + MLP head; see the module docstring."""

    name = "imagereward"

    def __init__(self, vision, text, head: AestheticMLP, tokenizer, *, dtype: torch.dtype | str | None = None,
                 device: torch.device | str | None = None, mean: float = IR_MEAN, std: float = IR_STD):
        super().__init__()
        if not getattr(text.config, "is_decoder", False):
            # transformers only builds the cross-attention layers when is_decoder is set in the text config.
            raise ValueError("imagereward: the BLIP text encoder has no cross-attention (text_config.is_decoder "
                             "is false)")
        if head.input_size != text.config.hidden_size:
            raise ValueError(f"imagereward head takes {head.input_size}-d features but the BLIP text encoder is "
                             f"{text.config.hidden_size}-d")
        self.vision, self.text, self.head, self.tokenizer = vision, text, head, tokenizer
        self.pipeline = ImagePipeline(size=vision.config.image_size, fit="crop")
        self.mean, self.std = float(mean), float(std)
        self.to(device=device or "cpu", dtype=resolve_dtype(dtype))
        self.freeze()

    def forward(self, images: Tensor, prompts: list[str]) -> Tensor:
        check_batch(images, prompts, self.name)
        x = self.pipeline(images.to(device=self.device, dtype=self.dtype))
        image_embeds = self.vision(pixel_values=x).last_hidden_state
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
        tok = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=MAX_PROMPT_TOKENS,
                             return_tensors="pt").to(self.device)
        out = self.text(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"],
                        encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts, is_decoder=False)
        r = self.head(out.last_hidden_state[:, 0, :]).squeeze(-1).float()
        return (r - self.mean) / self.std


@register("imagereward")
def build_imagereward(path: str | Path | None = None, head: str | Path | None = None, *,
                      checkpoint: str | Path | None = None, tokenizer: str | Path | None = None,
                      dtype: torch.dtype | str | None = None, device: torch.device | str | None = None,
                      vision_heads: int = 16, text_heads: int = 12) -> ImageRewardModel:
    """Two sources, one model:
    - `checkpoint=ImageReward.pt, tokenizer=<bert-base-uncased tokenizer folder>`: the released file, mapped
      into transformers' BLIP classes (blip_convert);
    - `path=<BlipForImageTextRetrieval folder>, head=<ImageReward.pt or MLP state dict>`: an already converted
      transformers folder (its own tokenizer unless `tokenizer` is given)."""
    if checkpoint is not None:
        if path is not None:
            raise ValueError("imagereward: give either checkpoint= (ImageReward.pt) or path= (a transformers "
                             "BLIP folder), not both")
        from flowbp_core.rewards.blip_convert import load_imagereward_towers

        ckpt = require_file(checkpoint, "imagereward checkpoint (ImageReward.pt)")
        if tokenizer is None:
            raise ValueError("imagereward: checkpoint= needs tokenizer= (a bert-base-uncased tokenizer folder)")
        vision, text, head_sd = load_imagereward_towers(ckpt, vision_heads=vision_heads, text_heads=text_heads)
        mlp = AestheticMLP(input_size=head_sd["layers.0.weight"].shape[1])
        mlp.load_state_dict(head_sd, strict=True)
        return ImageRewardModel(vision, text, mlp, load_tokenizer(tokenizer, "imagereward tokenizer"),
                                dtype=dtype, device=device)
    if path is None or head is None:
        raise ValueError("imagereward: expected checkpoint= (ImageReward.pt) with tokenizer=, or path= (a "
                         "transformers BLIP folder) with head=")
    from transformers import BlipForImageTextRetrieval

    folder = require_dir(path, "imagereward BLIP model (a BlipForImageTextRetrieval folder)")
    check_model_type(folder, ("blip",), "imagereward BLIP model")
    blip = BlipForImageTextRetrieval.from_pretrained(str(folder), local_files_only=True, dtype=resolve_dtype(dtype))
    tok = load_tokenizer(tokenizer if tokenizer is not None else folder, "imagereward tokenizer")
    # Only the two towers are kept; the ITM / projection heads of the retrieval model are not used.
    return ImageRewardModel(blip.vision_model, blip.text_encoder, load_ir_head(head), tok, dtype=dtype,
                            device=device)
