"""CLIPScore: image-text cosine similarity of a CLIP model, scaled by 100 as torchmetrics reports it (the FlowBP
paper's tables use openai/clip-vit-large-patch14).

torchmetrics and Hessel et al. clip negative similarities at 0 (max(cos, 0)); that clamp has zero slope, so it
is left out here: the value differs only for cos < 0, which real image-prompt pairs do not reach.
"""

from __future__ import annotations

from pathlib import Path

import torch

from flowbp_core.rewards.base import register
from flowbp_core.rewards.clip_family import ClipSimilarityReward, load_clip_folder, load_pipeline
from flowbp_core.rewards.preprocess import ImagePipeline


@register("clipscore")
def build_clipscore(path: str | Path, *, scale: float = 100.0, tokenizer: str | Path | None = None,
                    dtype: torch.dtype | str | None = None,
                    device: torch.device | str | None = None) -> ClipSimilarityReward:
    """path: a local transformers CLIP folder (e.g. openai/clip-vit-large-patch14)."""
    folder, model, tok = load_clip_folder(path, "clipscore model", dtype, tokenizer=tokenizer)
    pipe = load_pipeline(folder, ImagePipeline(size=224, fit="crop"))
    return ClipSimilarityReward(model, tok, pipe, name="clipscore", scale=float(scale), dtype=dtype, device=device)
