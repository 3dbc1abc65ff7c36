"""LAION aesthetic predictor v2 ("improved aesthetic predictor", `sac+logos+ava1-l14-linearMSE.pth`).

A linear-ish MLP on the L2-normalised CLIP ViT-L/14 image embedding; prompt-independent, about 1-10 (AVA scale).
The released head is a state dict of this exact layout (indices matter: strict loading):

    layers.0  Linear(768, 1024)     layers.1  Dropout(0.2)
    layers.2  Linear(1024, 128)     layers.3  Dropout(0.2)
    layers.4  Linear(128, 64)       layers.5  Dropout(0.1)
    layers.6  Linear(64, 16)
    layers.7  Linear(16, 1)

(no activations: the released model was trained that way). The CLIP tower loads from a local transformers folder
(openai/clip-vit-large-patch14): a full CLIPModel folder or a CLIPVisionModelWithProjection one.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowbp_core.dtypes import resolve_dtype
from flowbp_core.rewards.base import FrozenReward, check_batch, register, require_dir, require_file
from flowbp_core.rewards.clip_family import check_model_type, load_pipeline
from flowbp_core.rewards.preprocess import ImagePipeline


class AestheticMLP(nn.Module):
    def __init__(self, input_size: int = 768):
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


def load_head(path: str | Path) -> AestheticMLP:
    p = require_file(path, "aesthetic head (sac+logos+ava1-l14-linearMSE.pth, the MLP state dict)")
    sd = torch.load(str(p), map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd:
        sd = sd["state_dict"]
    if "layers.0.weight" not in sd:
        raise ValueError(f"{p}: expected an aesthetic MLP state dict with layers.0.weight ... layers.7.bias, "
                         f"got keys {sorted(sd)[:6]}")
    head = AestheticMLP(input_size=sd["layers.0.weight"].shape[1])
    head.load_state_dict(sd, strict=True)
    return head


@register("aesthetic")
class AestheticReward(FrozenReward):
    name = "aesthetic"

    def __init__(self, clip: str | Path, head: str | Path, *, dtype: torch.dtype | str | None = None,
                 device: torch.device | str | None = None):
        from transformers import CLIPVisionModelWithProjection

        super().__init__()
        folder = require_dir(clip, "aesthetic CLIP ViT-L/14 model")
        check_model_type(folder, ("clip", "clip_vision_model"), "aesthetic CLIP ViT-L/14 model")
        self.vision = CLIPVisionModelWithProjection.from_pretrained(str(folder), local_files_only=True,
                                                                    dtype=resolve_dtype(dtype))
        self.head = load_head(head)
        if self.head.input_size != self.vision.config.projection_dim:
            raise ValueError(f"aesthetic head takes {self.head.input_size}-d embeddings but the CLIP model in "
                             f"{str(folder)!r} projects to {self.vision.config.projection_dim}")
        self.pipeline = load_pipeline(folder, ImagePipeline(size=self.vision.config.image_size, fit="crop"))
        self.to(device=device or "cpu", dtype=resolve_dtype(dtype))
        self.freeze()

    def forward(self, images: Tensor, prompts: list[str]) -> Tensor:
        check_batch(images, prompts, self.name)
        x = self.pipeline(images.to(device=self.device, dtype=self.dtype))
        emb = F.normalize(self.vision(pixel_values=x).image_embeds.float(), dim=-1)
        return self.head(emb.to(self.dtype)).squeeze(-1).float()
