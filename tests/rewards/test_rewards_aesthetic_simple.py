"""LAION aesthetic v2 on a tiny CLIP, and the weight-free rewards."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flowbp_core.rewards import build
from flowbp_core.rewards.aesthetic import AestheticMLP
from flowbp_core.rewards.preprocess import ImagePipeline
from rewards_helpers import TINY_IMAGE, assert_pixel_grad

PROMPTS = ["a", "b", "c"]


@pytest.fixture(scope="module")
def head_file(tmp_path_factory):
    torch.manual_seed(3)
    head = AestheticMLP(input_size=16)  # the tiny CLIP projects to 16
    path = tmp_path_factory.mktemp("aes") / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(head.state_dict(), path)
    return path, head


def test_released_head_layout():
    keys = list(AestheticMLP(768).state_dict())
    assert keys == [f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")]


def test_aesthetic_matches_clip_embedding_then_head(tiny_clip_dir, head_file):
    from transformers import CLIPModel

    path, head = head_file
    reward = build("aesthetic", clip=tiny_clip_dir, head=path)
    torch.manual_seed(4)
    images = torch.rand(3, 3, 40, 48)
    got = assert_pixel_grad(reward, images, PROMPTS)
    src = CLIPModel.from_pretrained(tiny_clip_dir, local_files_only=True).eval()
    with torch.no_grad():
        emb = src.get_image_features(pixel_values=ImagePipeline(size=TINY_IMAGE)(images)).pooler_output
        want = head.eval()(F.normalize(emb, dim=-1)).squeeze(-1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # Prompt-independent, deterministic (dropout off even after .train()).
    reward.train()
    torch.testing.assert_close(reward(images, ["x", "y", "z"]), got)


def test_aesthetic_missing_head_names_the_file(tiny_clip_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="sac\\+logos\\+ava1-l14-linearMSE.pth"):
        build("aesthetic", clip=tiny_clip_dir, head=tmp_path / "missing.pth")


def test_aesthetic_rejects_a_wrong_head(tiny_clip_dir, tmp_path):
    torch.save({"fc.weight": torch.zeros(1, 16)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="layers.0.weight"):
        build("aesthetic", clip=tiny_clip_dir, head=tmp_path / "bad.pth")
    torch.save(AestheticMLP(768).state_dict(), tmp_path / "wide.pth")
    with pytest.raises(ValueError, match="768-d"):
        build("aesthetic", clip=tiny_clip_dir, head=tmp_path / "wide.pth")


@pytest.mark.parametrize("name", ["saturation", "contrast", "sharpness"])
def test_weight_free_rewards_have_pixel_gradients(name):
    torch.manual_seed(5)
    assert_pixel_grad(build(name), torch.rand(3, 3, 24, 20), PROMPTS)


def test_weight_free_rewards_order_images_sensibly():
    grey = torch.full((1, 3, 16, 16), 0.5)
    red = torch.zeros(1, 3, 16, 16)
    red[:, 0] = 1.0
    assert build("saturation")(grey, ["p"]) < 1e-3 < build("saturation")(red, ["p"])
    checker = (torch.arange(16).view(1, 16) + torch.arange(16).view(16, 1)) % 2
    checker = checker.float().expand(1, 3, 16, 16)
    halves = torch.zeros(1, 3, 16, 16)
    halves[..., 8:] = 1.0
    # Same contrast (half black, half white) but very different sharpness.
    torch.testing.assert_close(build("contrast")(checker, ["p"]), build("contrast")(halves, ["p"]))
    assert build("sharpness")(checker, ["p"]) > 10 * build("sharpness")(halves, ["p"])
    assert build("sharpness")(grey, ["p"]) == 0
    # Finite gradient even on a flat grey image (eps inside the square roots).
    x = grey.clone().requires_grad_(True)
    (build("saturation")(x, ["p"]) + build("contrast")(x, ["p"])).sum().backward()
    assert torch.isfinite(x.grad).all()
