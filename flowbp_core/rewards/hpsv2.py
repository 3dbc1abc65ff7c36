"""HPSv2.1: human-preference score of an image for a prompt, the reward of the FlowBP paper's tables.

The released checkpoint (`HPS_v2.1_compressed.pt`) is an OpenCLIP ViT-H-14 state dict; it is loaded into
transformers' CLIPModel through `openclip_convert` (no open_clip, no torchvision). Score, as in HPSv2's own
`score()`: the dot product of the L2-normalised image and text features (no logit scale), about 0.2-0.35.
Preprocessing as HPSv2's OpenCLIP transform: longest side to 224 (bicubic), pad to square with black, CLIP
mean/std.
"""

from __future__ import annotations

from pathlib import Path

import torch

from flowbp_core.rewards.base import register, require_file
from flowbp_core.rewards.clip_family import ClipSimilarityReward, load_tokenizer
from flowbp_core.rewards.openclip_convert import load_openclip_as_hf
from flowbp_core.rewards.preprocess import ImagePipeline



def hps_pipeline(image_size: int = 224) -> ImagePipeline:
    return ImagePipeline(size=image_size, fit="pad", interpolation="bicubic", pad_fill=0.0)


@register("hpsv2")
def build_hpsv2(checkpoint: str | Path, tokenizer: str | Path, *, dtype: torch.dtype | str | None = None,
                device: torch.device | str | None = None, vision_heads: int = 16, text_heads: int = 16,
                hidden_act: str = "gelu") -> ClipSimilarityReward:
    """checkpoint: `HPS_v2.1_compressed.pt` (OpenCLIP ViT-H-14 weights); tokenizer: a folder with a CLIP BPE
    tokenizer (e.g. the tokenizer files of a laion/CLIP-ViT-H-14 snapshot: all OpenAI-BPE CLIPs share it)."""
    ckpt = require_file(checkpoint, "hpsv2 checkpoint (HPS_v2.1_compressed.pt, an OpenCLIP ViT-H-14 state dict)")
    tok = load_tokenizer(tokenizer, "hpsv2 tokenizer")
    model = load_openclip_as_hf(ckpt, vision_heads=vision_heads, text_heads=text_heads, hidden_act=hidden_act,
                                eos_token_id=tok.eos_token_id)
    pipe = hps_pipeline(model.config.vision_config.image_size)
    return ClipSimilarityReward(model, tok, pipe, name="hpsv2", scale=1.0, dtype=dtype, device=device)
