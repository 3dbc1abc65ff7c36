"""Shared machinery of the CLIP-based rewards (HPSv2.1, PickScore, CLIPScore): load a transformers CLIP folder,
embed images with gradients and prompts without, and score their cosine similarity.

Text features do not depend on the images, so they are computed under no_grad and cached per prompt (bounded):
in training the same prompts come back every epoch, and the text tower is half of the model's cost.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from flowbp_core.dtypes import resolve_dtype
from flowbp_core.rewards.base import FrozenReward, check_batch, require_dir
from flowbp_core.rewards.preprocess import ImagePipeline

TEXT_CACHE_SIZE = 4096


def check_model_type(folder: Path, expected: tuple[str, ...], what: str) -> dict:
    """Read config.json and fail clearly when the folder holds another kind of model."""
    cfg = json.loads((folder / "config.json").read_text())
    mt = cfg.get("model_type")
    if mt not in expected:
        raise ValueError(f"{what}: {str(folder)!r} holds a model_type={mt!r} model; expected {' or '.join(expected)}")
    return cfg


def load_pipeline(folder: Path, default: ImagePipeline, fit=None) -> ImagePipeline:
    """The folder's own preprocessor_config.json when it has one (what its processor would do), else `default`."""
    p = folder / "preprocessor_config.json"
    if not p.is_file():
        return default
    return ImagePipeline.from_processor_config(json.loads(p.read_text()), fit=fit)


def load_tokenizer(folder: str | Path, what: str):
    from transformers import AutoTokenizer

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{what}: expected a tokenizer folder at {str(folder)!r} "
                                "(tokenizer_config.json with vocab.json + merges.txt or tokenizer.json)")
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


class ClipSimilarityReward(FrozenReward):
    """score = scale * cos(image_embed, text_embed); `scale="logit"` uses the model's own exp(logit_scale)."""

    def __init__(self, model, tokenizer, pipeline: ImagePipeline, *, name: str, scale: float | str = 1.0,
                 max_length: int | None = None, dtype: torch.dtype | str | None = None,
                 device: torch.device | str | None = None):
        super().__init__()
        self.name = name
        self.model = model
        self.tokenizer = tokenizer
        self.pipeline = pipeline
        self._scale = scale
        self.max_length = max_length or model.config.text_config.max_position_embeddings
        self._text_cache: OrderedDict[str, Tensor] = OrderedDict()
        self.to(device=device or "cpu", dtype=resolve_dtype(dtype))
        self.freeze()

    @property
    def scale(self) -> float:
        if self._scale == "logit":
            return float(self.model.logit_scale.detach().float().exp())
        return float(self._scale)

    def image_features(self, images: Tensor) -> Tensor:
        x = self.pipeline(images.to(device=self.device, dtype=self.dtype))
        pooled = self.model.vision_model(pixel_values=x).pooler_output
        return F.normalize(self.model.visual_projection(pooled).float(), dim=-1)

    @torch.no_grad()
    def text_features(self, prompts: list[str]) -> Tensor:
        todo = list(dict.fromkeys(p for p in prompts if p not in self._text_cache))
        if todo:
            tok = self.tokenizer(todo, padding="max_length", truncation=True, max_length=self.max_length,
                                 return_tensors="pt").to(self.device)
            pooled = self.model.text_model(input_ids=tok["input_ids"],
                                           attention_mask=tok.get("attention_mask")).pooler_output
            feats = F.normalize(self.model.text_projection(pooled).float(), dim=-1)
            for p, f in zip(todo, feats):
                self._text_cache[p] = f
            while len(self._text_cache) > TEXT_CACHE_SIZE:
                self._text_cache.popitem(last=False)
        return torch.stack([self._text_cache[p] for p in prompts])

    def forward(self, images: Tensor, prompts: list[str]) -> Tensor:
        check_batch(images, prompts, self.name)
        img = self.image_features(images)
        txt = self.text_features(list(prompts)).to(img.device)
        return self.scale * (img * txt).sum(-1)

    def _apply(self, fn, *args, **kwargs):
        # A dtype/device change invalidates cached text features.
        self._text_cache = OrderedDict()
        return super()._apply(fn, *args, **kwargs)


def load_clip_folder(path: str | Path, what: str, dtype=None, tokenizer: str | Path | None = None):
    """CLIPModel + tokenizer from a local transformers folder (no network), with a clear error for the wrong kind.

    The tokenizer comes from `tokenizer` when given, else from the model folder itself."""
    from transformers import CLIPModel

    folder = require_dir(path, what)
    check_model_type(folder, ("clip",), what)
    model = CLIPModel.from_pretrained(str(folder), local_files_only=True, dtype=resolve_dtype(dtype))
    tok = load_tokenizer(tokenizer if tokenizer is not None else folder, what + " tokenizer")
    return folder, model, tok
