"""The tensor preprocessing against transformers' own CLIP image processor (PIL), on a real photograph.

Stated tolerance, in [0, 1] pixel units after undoing the normalisation: mean |diff| < 2e-3 (half a uint8 step),
99th percentile < 6e-3, max < 0.1. The residual comes from PIL's uint8 rounding after the resize and its clipping
of the bicubic overshoot at hard edges; we keep the overshoot on purpose (a clamp would block gradients there).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from flowbp_core.rewards.preprocess import (CLIP_MEAN, CLIP_STD, ImagePipeline, center_crop, longest_side_size,
                                            pad_to_square)
from rewards_helpers import load_sample_image, sample_image_path


def to_01(x: torch.Tensor) -> torch.Tensor:
    return x * torch.tensor(CLIP_STD).view(1, 3, 1, 1) + torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)


@pytest.mark.parametrize("box", [None, (0, 0, 512, 420), (30, 10, 330, 210), (0, 0, 120, 90), (0, 0, 180, 180)])
def test_matches_clip_image_processor_on_a_photo(box):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    img = Image.open(sample_image_path()).convert("RGB")
    if box:
        img = img.crop(box)
    proc = CLIPImageProcessorPil()  # CLIP defaults: shortest side 224, bicubic, crop 224
    ref = proc(images=img, return_tensors="pt")["pixel_values"]
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 255.0
    pipe = ImagePipeline.from_processor_config(proc.to_dict())
    out = pipe(x)
    assert out.shape == ref.shape == (1, 3, 224, 224)
    d = (to_01(out) - to_01(ref)).abs().flatten()
    assert d.mean() < 2e-3, d.mean()
    assert torch.quantile(d, 0.99) < 6e-3
    assert d.max() < 0.1


def test_pipeline_is_differentiable_and_batched():
    x = load_sample_image().repeat(2, 1, 1, 1).requires_grad_(True)
    for fit in ("crop", "pad", "stretch"):
        y = ImagePipeline(size=64, fit=fit)(x)
        assert y.shape == (2, 3, 64, 64)
        (g,) = torch.autograd.grad(y.square().sum(), x)
        assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_pad_mode_follows_openclip_resize_max_size():
    x = torch.ones(1, 3, 100, 50)
    assert longest_side_size(100, 50, 32) == (32, 16)
    y = ImagePipeline(size=32, fit="pad", mean=(0, 0, 0), std=(1, 1, 1))(x)
    # 16 columns of image centred: 8 black columns each side, image values ~1 inside.
    assert torch.allclose(y[..., :, :8], torch.zeros(1)) and torch.allclose(y[..., :, 24:], torch.zeros(1))
    assert torch.allclose(y[..., :, 8:24], torch.ones(1), atol=1e-5)
    assert pad_to_square(torch.zeros(1, 3, 5, 3), 6).shape == (1, 3, 6, 6)
    with pytest.raises(ValueError, match="larger than"):
        pad_to_square(torch.zeros(1, 3, 7, 3), 6)


def test_center_crop_uses_floor_offsets():
    x = torch.arange(7.0).view(1, 1, 1, 7).expand(1, 1, 7, 7)
    assert center_crop(x, (4, 4))[0, 0, 0].tolist() == [1.0, 2.0, 3.0, 4.0]  # (7 - 4) // 2 = 1


def test_processor_config_errors_name_the_field():
    with pytest.raises(ValueError, match="resample=0"):
        ImagePipeline.from_processor_config({"resample": 0})
    with pytest.raises(ValueError, match="only square"):
        ImagePipeline.from_processor_config({"size": {"height": 10, "width": 12}})
    with pytest.raises(ValueError, match=r"\[B,3,H,W\]"):
        ImagePipeline()(torch.zeros(3, 8, 8))


@pytest.mark.parametrize("box", [None, (0, 0, 512, 300), (40, 0, 240, 600)])
def test_pad_mode_matches_openclip_resize_max_size_on_a_photo(box):
    """HPSv2's transform is OpenCLIP's ResizeMaxSize on a PIL image (torchvision's resize = PIL bicubic), then
    pad with black, then normalise; re-done here with PIL directly as the reference. Same tolerance as above."""
    img = Image.open(sample_image_path()).convert("RGB")
    if box:
        img = img.crop(box)
    w, h = img.size
    scale = 224 / max(w, h)
    nw, nh = round(w * scale), round(h * scale)
    canvas = Image.new("RGB", (224, 224), (0, 0, 0))
    canvas.paste(img.resize((nw, nh), Image.BICUBIC), ((224 - nw) // 2, (224 - nh) // 2))
    ref = torch.from_numpy(np.array(canvas)).permute(2, 0, 1)[None].float() / 255.0
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 255.0
    out = to_01(ImagePipeline(size=224, fit="pad")(x))
    d = (out - ref).abs().flatten()
    assert d.mean() < 2e-3, d.mean()
    assert torch.quantile(d, 0.99) < 6e-3
    assert d.max() < 0.1
