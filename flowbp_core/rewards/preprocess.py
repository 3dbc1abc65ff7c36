"""Differentiable image preprocessing for reward models, written as tensor ops.

Reward models ship a PIL-based processor (resize, crop, uint8 rounding, normalise). A gradient cannot pass through
PIL, so each step is re-written here on float tensors and checked against the model's own processor in
tests/rewards/test_preprocess.py (stated tolerance there). No clamp anywhere: a clamp of the bicubic overshoot
would have zero slope exactly where the gradient is needed.

Size conventions (followed exactly so that the output grid matches the processor's):
- shortest side (CLIP, BLIP, ImageReward): short -> size, long -> int(size * long / short) (transformers and
  torchvision both truncate);
- longest side (OpenCLIP `ResizeMaxSize`, HPSv2): scale = size / long, each side round(side * scale), then pad
  (left/top = pad // 2) with `fill`, in pixel space (before normalisation, as OpenCLIP pads the PIL image);
- center crop: top = (H - h) // 2, left = (W - w) // 2 (transformers' convention; torchvision rounds instead, a
  one-pixel difference only when H - h is odd).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

Interp = Literal["bicubic", "bilinear"]

# PIL resample codes as stored in preprocessor_config.json ("resample": 3) -> our interpolation names.
_PIL_RESAMPLE = {2: "bilinear", 3: "bicubic"}


def resize(images: Tensor, size: tuple[int, int], mode: Interp = "bicubic", antialias: bool = True) -> Tensor:
    """Resize [B,C,H,W] to (h, w). Antialias matters when shrinking a 1024 px sample to 224 (PIL filters)."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    # Interpolation in float32 at least: bf16 bicubic weights lose ~1e-2 and are unsupported on some CPUs.
    work = images if images.dtype in (torch.float32, torch.float64) else images.float()
    out = F.interpolate(work, size=size, mode=mode, align_corners=False, antialias=antialias)
    return out.to(images.dtype)


def shortest_side_size(h: int, w: int, size: int) -> tuple[int, int]:
    short, long = (h, w) if h <= w else (w, h)
    new_long = int(size * long / short)
    return (size, new_long) if h <= w else (new_long, size)


def longest_side_size(h: int, w: int, size: int) -> tuple[int, int]:
    scale = size / float(max(h, w))
    return round(h * scale), round(w * scale)


def resize_shortest(images: Tensor, size: int, mode: Interp = "bicubic") -> Tensor:
    return resize(images, shortest_side_size(images.shape[-2], images.shape[-1], size), mode)


def resize_longest(images: Tensor, size: int, mode: Interp = "bicubic") -> Tensor:
    return resize(images, longest_side_size(images.shape[-2], images.shape[-1], size), mode)


def center_crop(images: Tensor, size: tuple[int, int]) -> Tensor:
    """Crop the centre (h, w); pads with zeros first where the image is smaller (as transformers does)."""
    h, w = size
    H, W = images.shape[-2:]
    if H < h or W < w:
        ph, pw = max(h - H, 0), max(w - W, 0)
        images = F.pad(images, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        H, W = images.shape[-2:]
    top, left = (H - h) // 2, (W - w) // 2
    return images[..., top:top + h, left:left + w]


def pad_to_square(images: Tensor, size: int, fill: float = 0.0) -> Tensor:
    """Pad [B,C,h,w] (h, w <= size) to size x size, image centred (left/top get pad // 2)."""
    H, W = images.shape[-2:]
    if H > size or W > size:
        raise ValueError(f"pad_to_square: image {H}x{W} is larger than {size}")
    ph, pw = size - H, size - W
    return F.pad(images, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=fill)


def normalize(images: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - m) / s


@dataclass(frozen=True)
class ImagePipeline:
    """One reward model's input pipeline: [B,3,H,W] in [0,1] -> normalised [B,3,size,size].

    fit="crop": resize shortest side to `resize_to`, center-crop `size` (CLIP, PickScore, aesthetic, BLIP).
    fit="pad": resize longest side to `size`, pad to square with `pad_fill` (HPSv2 / OpenCLIP ResizeMaxSize).
    fit="stretch": resize straight to size x size (BLIP's own processor).
    """

    size: int = 224
    fit: Literal["crop", "pad", "stretch"] = "crop"
    resize_to: int | None = None  # shortest side before the crop; None -> size
    interpolation: Interp = "bicubic"
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    pad_fill: float = 0.0

    def __call__(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"ImagePipeline: images must be [B,3,H,W], got {tuple(images.shape)}")
        if self.fit == "crop":
            x = resize_shortest(images, self.resize_to or self.size, self.interpolation)
            x = center_crop(x, (self.size, self.size))
        elif self.fit == "pad":
            H, W = images.shape[-2:]
            if (H, W) == (self.size, self.size):
                x = images
            else:
                x = pad_to_square(resize_longest(images, self.size, self.interpolation), self.size, self.pad_fill)
        elif self.fit == "stretch":
            x = resize(images, (self.size, self.size), self.interpolation)
        else:  # pragma: no cover - Literal guards it for type checkers only
            raise ValueError(f"ImagePipeline.fit={self.fit!r}: expected crop, pad or stretch")
        return normalize(x, self.mean, self.std)

    @classmethod
    def from_processor_config(cls, cfg: dict, fit: Literal["crop", "pad", "stretch"] | None = None) -> "ImagePipeline":
        """Read a transformers preprocessor_config.json (CLIP or BLIP image processor) into a pipeline."""
        size = cfg.get("size", {"shortest_edge": 224})
        crop = cfg.get("crop_size")
        if isinstance(size, int):
            size = {"shortest_edge": size}
        resample = cfg.get("resample", 3)
        if resample not in _PIL_RESAMPLE:
            raise ValueError(f"preprocessor_config resample={resample!r}: expected 2 (bilinear) or 3 (bicubic)")
        mean = tuple(cfg.get("image_mean", CLIP_MEAN))
        std = tuple(cfg.get("image_std", CLIP_STD))
        if "shortest_edge" in size:
            if not cfg.get("do_center_crop", True) or crop is None:
                raise ValueError("preprocessor_config: shortest_edge resize without a center crop is not supported")
            if isinstance(crop, int):
                crop = {"height": crop, "width": crop}
            if crop["height"] != crop["width"]:
                raise ValueError(f"preprocessor_config crop_size={crop}: only square crops are supported")
            return cls(size=crop["height"], fit=fit or "crop", resize_to=size["shortest_edge"],
                       interpolation=_PIL_RESAMPLE[resample], mean=mean, std=std)
        if "height" in size and "width" in size:
            if size["height"] != size["width"]:
                raise ValueError(f"preprocessor_config size={size}: only square sizes are supported")
            return cls(size=size["height"], fit=fit or "stretch", interpolation=_PIL_RESAMPLE[resample],
                       mean=mean, std=std)
        raise ValueError(f"preprocessor_config size={size!r}: expected shortest_edge or height/width")
