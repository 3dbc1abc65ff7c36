"""PickScore (Kirstain et al. 2023): a CLIP-H fine-tuned on Pick-a-Pic preferences, a transformers CLIPModel
folder (`yuvalkirstain/PickScore_v1`). Score as in its model card: exp(logit_scale) * cos(image, text), about
18-24 for ordinary images. Its processor is CLIP's (shortest side 224 bicubic, center crop, CLIP mean/std);
the folder's own preprocessor_config.json is followed when present.
"""

from __future__ import annotations

from pathlib import Path

import torch

from flowbp_core.rewards.base import register
from flowbp_core.rewards.clip_family import ClipSimilarityReward, load_clip_folder, load_pipeline
from flowbp_core.rewards.preprocess import ImagePipeline


@register("pickscore")
def build_pickscore(path: str | Path, *, tokenizer: str | Path | None = None,
                    dtype: torch.dtype | str | None = None,
                    device: torch.device | str | None = None) -> ClipSimilarityReward:
    """path: a local PickScore_v1 folder (config.json, weights, tokenizer, preprocessor_config.json).
    tokenizer: optional separate tokenizer folder (the PickScore repo itself ships none; its card uses
    laion/CLIP-ViT-H-14-laion2B-s32B-b79K's processor)."""
    folder, model, tok = load_clip_folder(path, "pickscore model", dtype, tokenizer=tokenizer)
    pipe = load_pipeline(folder, ImagePipeline(size=224, fit="crop"))
    return ClipSimilarityReward(model, tok, pipe, name="pickscore", scale="logit", dtype=dtype, device=device)
