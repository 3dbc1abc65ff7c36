"""The attribute recogniser: a small CNN over 32x32 scenes with count, colour, shape and position heads.

Heads (all categorical or binary, read from one 256-d feature of a flattened 8x8 map so position survives):
- `pair_count`  [B, 6 colours, 3 shapes, 4]: how many objects of that colour and shape (0-3)
- `shape_count` [B, 3, 4]: how many objects of that shape, any colour
- `colour_count`[B, 6, 4]: how many objects of that colour, any shape
- `pair_pos`    [B, 6, 3, 5]: logits of "an object of that colour and shape lies in region r" (the judge's
  region rules applied to the ground-truth centres)
Trained by train_reward.py on rendered scenes with blur, noise and colour jitter, so that it reads a
generator's soft samples as well as crisp renders. It is the reward's model, never the judge's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from flowbp_core.world.judge import position_ok
from flowbp_core.world.scenes import Scene
from flowbp_core.world.spec import COLOURS, POSITIONS, SHAPES

N_COL, N_SHP, N_POS, N_CNT = len(COLOURS), len(SHAPES), len(POSITIONS), 4
COL_IDX = {c: i for i, c in enumerate(COLOURS)}
SHP_IDX = {s: i for i, s in enumerate(SHAPES)}
POS_IDX = {p: i for i, p in enumerate(POSITIONS)}


@dataclass(frozen=True)
class RecogniserConfig:
    width: int = 32
    feature: int = 256
    # Gaussian blur (sigma, pixels) applied inside the model before the first convolution; 0 = none. It makes
    # the reward blind to the patch-period textures (4 px) that alignment otherwise learns to paint to fool a
    # CNN, at the cost of some fine shape detail (a 4-px period keeps exp(-2 pi^2 sigma^2 / 16) of its
    # amplitude: 6 % at sigma 1.5).
    input_blur: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of [B, C, H, W] with reflect padding (radius ceil(3 sigma)); differentiable."""
    r = max(1, int(np.ceil(3.0 * sigma)))
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    x = nn.functional.pad(x, (r, r, r, r), mode="reflect")
    x = nn.functional.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return nn.functional.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


class Recogniser(nn.Module):
    def __init__(self, cfg: RecogniserConfig = RecogniserConfig()) -> None:
        super().__init__()
        w = cfg.width
        self.cfg = cfg
        self.body = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.GELU(),
            nn.Conv2d(w, w, 3, padding=1), nn.GELU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.GELU(),  # 16x16
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.GELU(),
            nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1), nn.GELU(),  # 8x8
            nn.Conv2d(2 * w, 32, 1), nn.GELU(),
        )
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(32 * 8 * 8, cfg.feature), nn.GELU())
        n_out = N_COL * N_SHP * N_CNT + N_SHP * N_CNT + N_COL * N_CNT + N_COL * N_SHP * N_POS
        self.head = nn.Linear(cfg.feature, n_out)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.cfg.input_blur > 0:
            images = gaussian_blur(images, self.cfg.input_blur)
        # Centre the input: the recogniser sees images in [0, 1] like every Reward.
        h = self.head(self.fc(self.body(images * 2.0 - 1.0)))
        b = images.shape[0]
        sizes = [N_COL * N_SHP * N_CNT, N_SHP * N_CNT, N_COL * N_CNT, N_COL * N_SHP * N_POS]
        pc, sc, cc, pp = torch.split(h, sizes, dim=1)
        return {
            "pair_count": pc.reshape(b, N_COL, N_SHP, N_CNT),
            "shape_count": sc.reshape(b, N_SHP, N_CNT),
            "colour_count": cc.reshape(b, N_COL, N_CNT),
            "pair_pos": pp.reshape(b, N_COL, N_SHP, N_POS),
        }


def scene_labels(scenes: list[Scene]) -> dict[str, torch.Tensor]:
    """Ground-truth targets for the heads."""
    b = len(scenes)
    pair = np.zeros((b, N_COL, N_SHP), dtype=np.int64)
    pos = np.zeros((b, N_COL, N_SHP, N_POS), dtype=np.float32)
    for i, s in enumerate(scenes):
        for o in s.objects:
            ci, si = COL_IDX[o.colour], SHP_IDX[o.shape]
            pair[i, ci, si] += 1
            for p in POSITIONS:
                if position_ok(o.x, o.y, p, s.size):
                    pos[i, ci, si, POS_IDX[p]] = 1.0
    return {
        "pair_count": torch.from_numpy(np.minimum(pair, 3)),
        "shape_count": torch.from_numpy(np.minimum(pair.sum(1), 3)),
        "colour_count": torch.from_numpy(np.minimum(pair.sum(2), 3)),
        "pair_pos": torch.from_numpy(pos),
    }


def detected_labels(images: np.ndarray) -> dict[str, torch.Tensor]:
    """Targets for generated images [N, 3, H, W] in [0, 1]: what the analytic detector finds in them (colour
    masks, components, shape templates, centroid), in the format of `scene_labels`. Used to teach the recogniser
    the generator's own artefacts (train_reward --generated); the judge's per-prompt checks are not involved.
    A component of no world shape (merged objects, a blob) is left out: it is none of the objects counted."""
    from flowbp_core.world.judge import UNKNOWN_SHAPE, detect
    from flowbp_core.world.scenes import SceneObject

    scenes = []
    for img in images:
        objs = tuple(SceneObject(shape=d.shape, colour=d.colour, x=d.x, y=d.y, size=0.0) for d in detect(img)
                     if d.shape != UNKNOWN_SHAPE)
        scenes.append(Scene(objects=objs, background="gray", size=int(img.shape[-1])))
    return scene_labels(scenes)


def recogniser_loss(out: dict[str, torch.Tensor], lab: dict[str, torch.Tensor]) -> torch.Tensor:
    ce = nn.functional.cross_entropy
    loss = ce(out["pair_count"].reshape(-1, N_CNT), lab["pair_count"].reshape(-1))
    loss = loss + ce(out["shape_count"].reshape(-1, N_CNT), lab["shape_count"].reshape(-1))
    loss = loss + ce(out["colour_count"].reshape(-1, N_CNT), lab["colour_count"].reshape(-1))
    # Position only where an object of that pair exists: its absence is the count heads' job.
    present = (lab["pair_count"] > 0).unsqueeze(-1).float().expand_as(lab["pair_pos"])
    bce = nn.functional.binary_cross_entropy_with_logits(out["pair_pos"], lab["pair_pos"], reduction="none")
    loss = loss + (bce * present).sum() / present.sum().clamp_min(1.0)
    return loss
