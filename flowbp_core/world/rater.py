"""The rater: how much a person of fixed taste likes an image, on what the prompt leaves open. Analytic, never a reward.

The person likes large objects on a light background, drawn with crisp edges; and nothing at all in an image
that breaks the prompt. Per image, in points of 100:

    rating = 0                                  if the judge says the prompt is not followed (or a background
                                                   the prompt asks for is not the one drawn)
           = (global + local) / 2               otherwise, each part in [0, 100]
    global = 100 * (size + light) / 2           decided early in sampling: the scene's low frequencies
      size  = mean over objects of clip((s - 4.5) / (s_full - 4.5), 0, 1), s the half extent read from the
              object's area (pixels), s_full = 6.5 / 6.0 / 5.5 for 1 / 2 / 3 objects (three must still fit)
      light = clip((L - 0.45) / 0.4, 0, 1), L the median luminance of the background (grey 0 -> white 1);
              1 when the prompt asks for a background (it is then the prompt's choice, not the taste's)
    local  = 100 * clip(1 - soft / 0.8, 0, 1)   decided late: the high frequencies
      soft  = pixels part-way between background and object colour (chroma 15-85 % of the object's palette
              chroma) per object pixel; 0 for hard edges, ~0.55 for the renderer's anti-aliasing

The base model draws objects of half extent 4-5.5 on mid-grey with soft edges (it scores about 25), so there
is room for 70 points that never require breaking the prompt. Reported parts are means over samples with the
failed samples' parts at 0, so that the mean rating is the mean of the two parts' means halved.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flowbp_core.world.captions import parse
from flowbp_core.world.judge import (_PALETTE_HUES, _SIZE_FROM_AREA, UNKNOWN_SHAPE, _hue_deg, _to_numpy, check,
                                     detect)
from flowbp_core.world.spec import BACKGROUNDS, COLOURS, PromptSpec

SIZE_FLOOR = 4.5  # half extent (px) worth nothing: the base's data draw 4-5.5
SIZE_FULL = {1: 6.5, 2: 6.0, 3: 5.5}  # half extent worth everything, by the number of objects in the scene
LIGHT_FLOOR, LIGHT_SPAN = 0.45, 0.4  # background luminance: mid-grey worth nothing, 0.85 and above everything
SOFT_FULL = 0.8  # soft pixels per object pixel that leave no edge credit
BACKGROUND_CHROMA_MAX = 0.1  # pixels below this chroma count as background
_SOFT_BAND = (0.15, 0.85)  # chroma, as a fraction of the object's palette chroma, of a part-way pixel
_PALETTE = np.asarray(list(COLOURS.values()), dtype=np.float64)
_PALETTE_CHROMA = _PALETTE.max(1) - _PALETTE.min(1)


@dataclass(frozen=True, kw_only=True)
class Rating:
    """One image's rating.

    Attributes:
        score: the rating in [0, 100]: (global_part + local_part) / 2, or 0 when `follows` is False.
        global_part: layout and light in [0, 100] (0 when the prompt is broken).
        local_part: edge crispness in [0, 100] (0 when the prompt is broken).
        follows: the judge's verdict on the prompt (and the asked background, if any).
        size: mean size credit of the objects in [0, 1]; light: background credit in [0, 1];
        soft: part-way pixels per object pixel (>= 0).
        centre: mean (x, y) of the detected objects' centres as fractions of the image side, None when nothing
            is detected (placement: what the rater does not score, read by `placement_diversity`).
    """

    score: float
    global_part: float
    local_part: float
    follows: bool
    size: float
    light: float
    soft: float
    centre: tuple[float, float] | None = None


def _luma(rgb: np.ndarray) -> np.ndarray:
    return rgb.mean(-1)


def background_luminance(image: np.ndarray) -> float:
    """Median luminance of the low-chroma pixels of [3, H, W]; 0 when there are none (no background left)."""
    rgb = np.moveaxis(np.asarray(image, dtype=np.float64), 0, -1)
    chroma = rgb.max(-1) - rgb.min(-1)
    bg = chroma < BACKGROUND_CHROMA_MAX
    return float(np.median(_luma(rgb[bg]))) if bg.any() else 0.0


def background_name(luminance: float) -> str:
    """The named background whose luminance is nearest."""
    return min(BACKGROUNDS, key=lambda k: abs(float(np.mean(BACKGROUNDS[k])) - luminance))


def soft_ratio(image: np.ndarray) -> float:
    """Pixels part-way between the background and their (hue-nearest) palette colour, per solid object pixel."""
    rgb = np.moveaxis(np.asarray(image, dtype=np.float64), 0, -1)
    chroma = rgb.max(-1) - rgb.min(-1)
    d = np.abs(_hue_deg(rgb)[..., None] - _PALETTE_HUES)
    nearest = np.minimum(d, 360.0 - d).argmin(-1)
    rel = chroma / _PALETTE_CHROMA[nearest]
    soft = float(((rel > _SOFT_BAND[0]) & (rel < _SOFT_BAND[1])).sum())
    solid = float((rel >= _SOFT_BAND[1]).sum())
    return soft / max(solid, 1.0)


def rate_one(image: np.ndarray, spec: PromptSpec) -> Rating:
    """Rate one image [3, H, W] in [0, 1] for the prompt `spec`."""
    image = np.asarray(image, dtype=np.float64)
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"rater: expected an image [3, H, W], got {tuple(image.shape)}")
    objects = detect(image)  # the one detection of this image: verdict, sizes and placement all read it
    centre = (tuple(float(v) for v in np.mean([[o.x, o.y] for o in objects], axis=0) / image.shape[-1])
              if objects else None)
    lum = background_luminance(image)
    follows = check(spec, objects, size=image.shape[-1])
    if spec.background is not None:
        follows = follows and background_name(lum) == spec.background
    shaped = [o for o in objects if o.shape != UNKNOWN_SHAPE]
    full = SIZE_FULL[min(3, max(1, len(shaped)))]
    sizes = [np.clip((_SIZE_FROM_AREA[o.shape](o.area) - SIZE_FLOOR) / (full - SIZE_FLOOR), 0.0, 1.0) for o in shaped]
    size = float(np.mean(sizes)) if sizes else 0.0
    light = 1.0 if spec.background is not None else float(np.clip((lum - LIGHT_FLOOR) / LIGHT_SPAN, 0.0, 1.0))
    soft = soft_ratio(image)
    if not follows:
        return Rating(score=0.0, global_part=0.0, local_part=0.0, follows=False, size=size, light=light, soft=soft,
                      centre=centre)
    g = 100.0 * (size + light) / 2.0
    loc = 100.0 * float(np.clip(1.0 - soft / SOFT_FULL, 0.0, 1.0))
    return Rating(score=(g + loc) / 2.0, global_part=g, local_part=loc, follows=True, size=size, light=light,
                  soft=soft, centre=centre)


@dataclass(frozen=True, kw_only=True)
class RaterReport:
    """The rater's view of a batch.

    Attributes:
        score / global_part / local_part: means over samples, points of 100 (score = (global + local) / 2).
        ratings: one `Rating` per sample, in the batch's order.
    """

    score: float
    global_part: float
    local_part: float
    ratings: list[Rating]

    def as_dict(self) -> dict:
        return {"score": self.score, "global": self.global_part, "local": self.local_part, "n": len(self.ratings)}


def rate(images, prompts: list[str] | list[PromptSpec]) -> RaterReport:
    """Rate a batch [B, 3, H, W] in [0, 1] against its prompts (strings of the grammar, or PromptSpecs)."""
    arr = _to_numpy(images)
    if arr.ndim != 4 or len(arr) != len(prompts):
        raise ValueError(f"rate: {tuple(arr.shape)} images for {len(prompts)} prompts; expected [B, 3, H, W], B = "
                         "the number of prompts")
    specs = [p if isinstance(p, PromptSpec) else parse(p) for p in prompts]
    ratings = [rate_one(img, s) for img, s in zip(arr, specs)]
    mean = lambda k: float(np.mean([getattr(r, k) for r in ratings])) if ratings else float("nan")  # noqa: E731
    return RaterReport(score=mean("score"), global_part=mean("global_part"), local_part=mean("local_part"),
                       ratings=ratings)


def paired_interval(base: list[float], aligned: list[float], n_boot: int = 2000, level: float = 0.95,
                    seed: int = 0) -> tuple[float, float]:
    """A bootstrap interval for mean(aligned - base) of two ratings of the same prompts and noise (pairs resampled
    together, so what the prompt and noise share cancels)."""
    if len(base) != len(aligned) or not base:
        raise ValueError(f"paired_interval: {len(base)} base and {len(aligned)} aligned ratings; expected equal, > 0")
    d = np.asarray(aligned, dtype=np.float64) - np.asarray(base, dtype=np.float64)
    rng = np.random.default_rng(seed)
    boot = d[rng.integers(len(d), size=(n_boot, len(d)))].mean(1)
    lo, hi = np.quantile(boot, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return float(lo), float(hi)


def placement_diversity(ratings: list[Rating], groups: list[int]) -> float:
    """Mean pairwise distance (fraction of the image side) between where samples of one prompt put their objects
    (each rating's `centre`): the diversity of what the rater does not score. `groups[i]` names rating i's prompt."""
    if len(ratings) != len(groups):
        raise ValueError(f"placement_diversity: {len(ratings)} ratings for {len(groups)} group ids; expected one each")
    centre: dict[int, list[np.ndarray]] = {}
    for r, g in zip(ratings, groups):
        if r.centre is not None:
            centre.setdefault(g, []).append(np.asarray(r.centre))
    vals = []
    for pts in centre.values():
        if len(pts) >= 2:
            p = np.stack(pts)
            d = np.sqrt(((p[:, None] - p[None]) ** 2).sum(-1))
            vals.append(d.sum() / (len(p) * (len(p) - 1)))
    if not vals:
        raise ValueError("placement_diversity: no prompt has two or more samples with objects")
    return float(np.mean(vals))


__all__ = ["Rating", "RaterReport", "rate", "rate_one", "paired_interval", "placement_diversity",
           "background_luminance", "background_name"]
