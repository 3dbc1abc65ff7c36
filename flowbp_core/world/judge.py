"""The independent judge: an analytic, weight-free GenEval-like scorer for the world's images.

It shares nothing with the reward (no learned weights): pixels with chroma above a threshold are objects;
each gets the palette colour of nearest hue (hue survives anti-aliasing against a neutral background);
4-connected components of one colour are objects; a component's shape is the world shape (circle, square,
upward triangle, as the renderer draws them) whose best-placed template overlaps its mask most (IoU), or
"unknown" when none overlaps it well (merged objects, blobs, bars), and its centroid gives its position.
Each prompt is then checked the way GenEval checks its six tasks, and the score is the mean of the per-task
accuracies, in points of 100.

Why templates and not a fill ratio (area / bounding-box area, the first version): one stray edge pixel grows
a 9-pixel box by 11 %, so a generator's clearly drawn squares read 0.79-0.89 and were called circles, and its
circles 0.62-0.66 and were called triangles. Ground truth blurred by a 1-pixel Gaussian scored about 70 with
the fill ratio and scores about 90 with templates (tests/world/test_world_truth.py).

A diversity score (mean pairwise distance between samples of the same prompt) exposes reward hacking that
collapses the output.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from flowbp_core.world.captions import parse
from flowbp_core.world.scenes import SQUARE_HALF_SIDE, SceneObject, signed_distance
from flowbp_core.world.spec import COLOURS, SHAPES, TASKS, PromptSpec

CHROMA_MIN = 0.25
MIN_AREA = 12  # pixels; the smallest rendered object covers ~32
# Below this best template IoU a component is no world shape. Every ground-truth object, sharp or blurred by a
# 1-pixel Gaussian, fits its own template at >= 0.82; what falls under 0.7 in a generator's samples is two
# objects merged into one component, a bar or a shapeless blob.
SHAPE_IOU_MIN = 0.7
UNKNOWN_SHAPE = "unknown"


def _hue_deg(rgb: np.ndarray) -> np.ndarray:
    """Hue in degrees of [..., 3] RGB."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mx, mn = rgb.max(-1), rgb.min(-1)
    c = np.maximum(mx - mn, 1e-8)
    h = np.where(mx == r, ((g - b) / c) % 6.0, np.where(mx == g, (b - r) / c + 2.0, (r - g) / c + 4.0))
    return h * 60.0


_PALETTE_NAMES = tuple(COLOURS)
_PALETTE_HUES = _hue_deg(np.asarray([COLOURS[c] for c in _PALETTE_NAMES], dtype=np.float64))


@dataclass(frozen=True)
class DetectedObject:
    colour: str
    shape: str
    x: float
    y: float
    area: int
    shape_iou: float  # overlap with the best-fitting template of `shape` (of the best shape when unknown)


def position_ok(x: float, y: float, position: str, size: int = 32) -> bool:
    fx, fy = x / size, y / size
    if position == "left":
        return fx < 0.4
    if position == "right":
        return fx > 0.6
    if position == "top":
        return fy < 0.4
    if position == "bottom":
        return fy > 0.6
    if position == "centre":
        return abs(fx - 0.5) < 0.15 and abs(fy - 0.5) < 0.15
    raise ValueError(f"position={position!r}")


# Template fits tried per shape: sizes around the one the area implies, centres around the centroid (the search
# absorbs the size and half-pixel offset a generator's soft edges leave; 5 x 3 x 3 fits per shape).
_FIT_SCALES = (0.85, 0.925, 1.0, 1.075, 1.15)
_FIT_SHIFTS = (-0.5, 0.0, 0.5)
# Half extent s of each shape from its area, as the renderer draws them: circle pi s^2, square
# (2 SQUARE_HALF_SIDE s)^2, triangle (base 2s, height 2s) 2 s^2.
_SIZE_FROM_AREA = {"circle": lambda a: math.sqrt(a / math.pi),
                   "square": lambda a: math.sqrt(a) / (2.0 * SQUARE_HALF_SIDE),
                   "triangle": lambda a: math.sqrt(a / 2.0)}


def _shape_of(ys: np.ndarray, xs: np.ndarray, h: int, w: int) -> tuple[str, float]:
    """(shape, IoU) of the world shape whose best-fitting template overlaps this component's pixels most."""
    y0, y1 = max(0, int(ys.min()) - 4), min(h, int(ys.max()) + 5)
    x0, x1 = max(0, int(xs.min()) - 4), min(w, int(xs.max()) + 5)
    mask = np.zeros((y1 - y0, x1 - x0), dtype=bool)
    mask[ys - y0, xs - x0] = True
    py, px = np.meshgrid(np.arange(y0, y1) + 0.5, np.arange(x0, x1) + 0.5, indexing="ij")
    cx, cy = float(xs.mean()) + 0.5, float(ys.mean()) + 0.5
    best_shape, best_iou = UNKNOWN_SHAPE, 0.0
    for shape in SHAPES:
        s0 = _SIZE_FROM_AREA[shape](len(ys))
        for k in _FIT_SCALES:
            size = s0 * k
            # the triangle's centroid lies a third of its half height below its box centre
            oy = size / 3.0 if shape == "triangle" else 0.0
            for dx in _FIT_SHIFTS:
                for dy in _FIT_SHIFTS:
                    t = signed_distance(SceneObject(shape, "red", cx + dx, cy - oy + dy, size), px, py) < 0.0
                    iou = float((t & mask).sum()) / float((t | mask).sum())
                    if iou > best_iou:
                        best_shape, best_iou = shape, iou
    return (best_shape if best_iou >= SHAPE_IOU_MIN else UNKNOWN_SHAPE), best_iou


def detect(image: np.ndarray) -> list[DetectedObject]:
    """Objects in one image [3, H, W] (values in [0, 1])."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"detect(image): expected [3, H, W], got {tuple(image.shape)}")
    rgb = np.moveaxis(np.asarray(image, dtype=np.float64), 0, -1)
    h, w, _ = rgb.shape
    chroma = rgb.max(-1) - rgb.min(-1)
    hue = _hue_deg(rgb)
    d = np.abs(hue[..., None] - _PALETTE_HUES[None, None, :])
    d = np.minimum(d, 360.0 - d)
    label = np.where(chroma > CHROMA_MIN, d.argmin(-1), -1)
    seen = np.zeros((h, w), dtype=bool)
    out: list[DetectedObject] = []
    for sy in range(h):
        for sx in range(w):
            if label[sy, sx] < 0 or seen[sy, sx]:
                continue
            lab = label[sy, sx]
            q = deque([(sy, sx)])
            seen[sy, sx] = True
            ys, xs = [], []
            while q:
                cy, cx = q.popleft()
                ys.append(cy)
                xs.append(cx)
                for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
                    if 0 <= ny < h and 0 <= nx < w and not seen[ny, nx] and label[ny, nx] == lab:
                        seen[ny, nx] = True
                        q.append((ny, nx))
            area = len(ys)
            if area < MIN_AREA:
                continue
            shape, iou = _shape_of(np.asarray(ys), np.asarray(xs), h, w)
            out.append(
                DetectedObject(
                    colour=_PALETTE_NAMES[lab], shape=shape, x=float(np.mean(xs)) + 0.5, y=float(np.mean(ys)) + 0.5,
                    area=area, shape_iou=iou,
                )
            )
    return out


def check(spec: PromptSpec, objects: list[DetectedObject], size: int = 32) -> bool:
    """Does an image with these detected objects satisfy the prompt (GenEval's rule for its task)?"""
    t, o = spec.task, spec.objects

    def has(shape=None, colour=None, position=None) -> bool:
        return any(
            (shape is None or d.shape == shape)
            and (colour is None or d.colour == colour)
            and (position is None or position_ok(d.x, d.y, position, size))
            for d in objects
        )

    if t == "single_object":
        return has(shape=o[0].shape)
    if t == "two_objects":
        return has(shape=o[0].shape) and has(shape=o[1].shape)
    if t == "counting":
        same_colour = [d for d in objects if d.colour == o[0].colour]
        return len(same_colour) == spec.count and all(d.shape == o[0].shape for d in same_colour)
    if t == "colours":
        return has(shape=o[0].shape, colour=o[0].colour)
    if t == "position":
        return has(shape=o[0].shape, colour=o[0].colour, position=o[0].position)
    if t == "colour_attr":
        return has(shape=o[0].shape, colour=o[0].colour) and has(shape=o[1].shape, colour=o[1].colour)
    raise ValueError(f"task={t!r}")


@dataclass
class JudgeReport:
    overall: float  # mean of per-task accuracies, points of 100
    per_task: dict[str, float]  # points of 100
    n: int
    correct: list[bool] = field(repr=False, default_factory=list)
    diversity: float | None = None

    def as_dict(self) -> dict:
        return {"overall": self.overall, "per_task": dict(self.per_task), "n": self.n, "diversity": self.diversity}


def _to_numpy(images) -> np.ndarray:
    if isinstance(images, torch.Tensor):
        return images.detach().float().clamp(0, 1).cpu().numpy()
    return np.asarray(images, dtype=np.float32)


def evaluate(images, prompts: list[str] | list[PromptSpec]) -> JudgeReport:
    """Judge a batch [B, 3, H, W] against its prompts (strings of the grammar, or PromptSpecs)."""
    arr = _to_numpy(images)
    if len(arr) != len(prompts):
        raise ValueError(f"evaluate: {len(arr)} images but {len(prompts)} prompts")
    specs = [p if isinstance(p, PromptSpec) else parse(p) for p in prompts]
    correct = [check(s, detect(img), size=img.shape[-1]) for s, img in zip(specs, arr)]
    per_task: dict[str, float] = {}
    for task in TASKS:
        vals = [c for c, s in zip(correct, specs) if s.task == task]
        if vals:
            per_task[task] = 100.0 * float(np.mean(vals))
    overall = float(np.mean(list(per_task.values()))) if per_task else float("nan")
    return JudgeReport(overall=overall, per_task=per_task, n=len(specs), correct=correct)


def paired_delta_interval(base: list[bool], aligned: list[bool], tasks: list[str], n_boot: int = 2000,
                          level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """A bootstrap interval for (aligned - base) overall score, in points, of two judgements of the same samples.

    The samples are resampled in pairs (one sample's base and aligned verdicts travel together, so the shared
    prompt and noise cancel) and within each task (the overall score is a mean of per-task accuracies). One
    sample moves its task by 100 / (samples of that task) points: on a few hundred samples a gain of a few points
    can be noise, and this says how much."""
    if not (len(base) == len(aligned) == len(tasks)):
        raise ValueError(f"paired_delta_interval: {len(base)} base, {len(aligned)} aligned, {len(tasks)} tasks")
    if not 0.0 < level < 1.0:
        raise ValueError(f"paired_delta_interval: level={level} must be in (0, 1)")
    rng = np.random.default_rng(seed)
    diff = np.asarray(aligned, dtype=np.float64) - np.asarray(base, dtype=np.float64)
    per_task = [diff[[i for i, t in enumerate(tasks) if t == task]] for task in TASKS if task in tasks]
    boot = np.zeros(n_boot)
    for d in per_task:
        boot += d[rng.integers(len(d), size=(n_boot, len(d)))].mean(1)
    boot *= 100.0 / len(per_task)
    lo, hi = np.quantile(boot, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return float(lo), float(hi)


def diversity(images, groups: list[int]) -> float:
    """Mean pairwise RMS pixel distance between images that share a group id (same prompt, other seeds).

    0 means every prompt's samples are identical (mode collapse); distinct random scenes of one prompt
    score ~0.2-0.3 on this world.
    """
    arr = _to_numpy(images).reshape(len(groups), -1)
    by: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        by.setdefault(g, []).append(i)
    vals = []
    for idx in by.values():
        if len(idx) < 2:
            continue
        x = arr[idx]
        d = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).mean(-1))
        k = len(idx)
        vals.append(d.sum() / (k * (k - 1)))
    if not vals:
        raise ValueError("diversity: no group has two or more samples")
    return float(np.mean(vals))


__all__ = ["detect", "check", "evaluate", "diversity", "paired_delta_interval", "position_ok", "DetectedObject",
           "JudgeReport", "SHAPE_IOU_MIN", "UNKNOWN_SHAPE"]
