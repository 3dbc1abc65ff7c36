"""The procedural world: 32x32 RGB scenes of 1-3 flat objects on a neutral background, with ground truth.

Objects are drawn from signed distance functions with analytic anti-aliasing (pixel coverage =
clamp(0.5 - d, 0, 1)), so edges are soft the way a generator's output is, and the ground truth is exact.
Backgrounds are neutral (zero chroma) on purpose: the judge finds objects by chroma and hue, and mixing a
colour with a neutral grey keeps its hue, so anti-aliased edge pixels never look like another colour.
Everything is deterministic given a `numpy.random.Generator`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from flowbp_core.world.spec import (
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    SHAPES,
    ObjectSpec,
    PromptSpec,
)

IMAGE_SIZE = 32

# Region boxes (fractions of the image) where an object asked to be at a position is placed. The judge's
# rules (judge.position_of) accept a wider area, so ground truth is always unambiguous.
_REGION_BOX: dict[str, tuple[float, float, float, float]] = {
    # name: (x_lo, x_hi, y_lo, y_hi) of the object's centre
    "left": (0.17, 0.28, 0.32, 0.68),
    "right": (0.72, 0.83, 0.32, 0.68),
    "top": (0.32, 0.68, 0.17, 0.28),
    "bottom": (0.32, 0.68, 0.72, 0.83),
    "centre": (0.44, 0.56, 0.44, 0.56),
}
_SIZE_RANGE = (4.0, 5.5)  # half extent in pixels
# A square's half side, as a fraction of its half extent: slightly smaller than the bounding box so the three
# shapes have similar areas (the judge sizes its square template from this too).
SQUARE_HALF_SIDE = 0.9
_GAP = 2.0  # minimum pixels between two objects' bounding boxes, so that components never merge


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    x: float  # centre, pixels from the left edge
    y: float  # centre, pixels from the top edge
    size: float  # half extent, pixels

    def bbox(self) -> tuple[float, float, float, float]:
        return (self.x - self.size, self.x + self.size, self.y - self.size, self.y + self.size)


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background: str
    size: int = IMAGE_SIZE
    spec: PromptSpec | None = field(default=None, compare=False)


def signed_distance(obj: SceneObject, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """Signed distance (pixels, negative inside) of `obj` at pixel centres (px, py)."""
    dx, dy = px - obj.x, py - obj.y
    s = obj.size
    if obj.shape == "circle":
        return np.sqrt(dx * dx + dy * dy) - s
    if obj.shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) - SQUARE_HALF_SIDE * s
    if obj.shape == "triangle":
        # Upward isosceles triangle with base 2s at y + s and apex at y - s: the intersection of three
        # half-planes; the max of their normalised distances is exact inside and a good AA ramp outside.
        base = dy - s
        # side edges: through the apex (0, -s) and the base corners (+-s, s); normal ~ (2, -1)/sqrt(5)
        inv = 1.0 / np.sqrt(5.0)
        right = (2.0 * dx - (dy + s)) * inv
        left = (-2.0 * dx - (dy + s)) * inv
        return np.maximum(base, np.maximum(left, right))
    raise ValueError(f"shape={obj.shape!r} is not one of {SHAPES}")


def render(scene: Scene, edge: float = 1.0, background_rgb: tuple[float, float, float] | None = None) -> np.ndarray:
    """Render to a float32 array [3, H, W] in [0, 1] with anti-aliased edges.

    `edge` is the width in pixels of the coverage ramp (1: analytic anti-aliasing; smaller is crisper, larger
    softer); `background_rgb` replaces the named background's colour (the preference data's tone variants)."""
    if not 0.05 <= edge <= 8.0:
        raise ValueError(f"render: edge={edge!r}: allowed range is [0.05, 8] pixels")
    n = scene.size
    centres = np.arange(n, dtype=np.float32) + 0.5
    py, px = np.meshgrid(centres, centres, indexing="ij")
    if scene.background not in BACKGROUNDS:
        raise ValueError(f"background={scene.background!r} is not one of {tuple(BACKGROUNDS)}")
    img = np.empty((3, n, n), dtype=np.float32)
    bg = BACKGROUNDS[scene.background] if background_rgb is None else background_rgb
    img[:] = np.asarray(bg, dtype=np.float32)[:, None, None]
    for obj in scene.objects:
        if obj.colour not in COLOURS:
            raise ValueError(f"colour={obj.colour!r} is not one of {tuple(COLOURS)}")
        cover = np.clip(0.5 - signed_distance(obj, px, py) / edge, 0.0, 1.0).astype(np.float32)
        col = np.asarray(COLOURS[obj.colour], dtype=np.float32)[:, None, None]
        img = img * (1.0 - cover) + col * cover
    return img


def render_batch(scenes: list[Scene]) -> np.ndarray:
    return np.stack([render(s) for s in scenes]) if scenes else np.zeros((0, 3, IMAGE_SIZE, IMAGE_SIZE), np.float32)


def separated(a: SceneObject, b: SceneObject) -> bool:
    """True when the bounding boxes of `a` and `b` are at least the minimum gap apart (their pixels never touch)."""
    ax0, ax1, ay0, ay1 = a.bbox()
    bx0, bx1, by0, by1 = b.bbox()
    return ax1 + _GAP <= bx0 or bx1 + _GAP <= ax0 or ay1 + _GAP <= by0 or by1 + _GAP <= ay0


def _place(shape: str, colour: str, position: str | None, rng: np.random.Generator, n: int,
           size_range: tuple[float, float] = _SIZE_RANGE) -> SceneObject:
    s = float(rng.uniform(*size_range))
    if position is None:
        lo, hi = s + 1.0, n - s - 1.0
        x, y = rng.uniform(lo, hi), rng.uniform(lo, hi)
    else:
        x0, x1, y0, y1 = _REGION_BOX[position]
        x, y = rng.uniform(x0 * n, x1 * n), rng.uniform(y0 * n, y1 * n)
    return SceneObject(shape=shape, colour=colour, x=float(x), y=float(y), size=s)


def sample_scene(spec: PromptSpec, rng: np.random.Generator, size: int = IMAGE_SIZE, max_tries: int = 200,
                 size_range: tuple[float, float] = _SIZE_RANGE) -> Scene:
    """A random scene that satisfies `spec` exactly (the objects it asks for and nothing else).

    Attributes the prompt leaves open (a colour, a position, the background) are drawn at random; `size_range`
    bounds the objects' half extents (the base model's data use the default).
    """
    wanted: list[ObjectSpec] = []
    for o in spec.objects:
        wanted.extend([o] * (spec.count if spec.task == "counting" else 1))
    # A counting prompt's copies share one colour; other open colours are drawn per object.
    shared = {id(o): (o.colour or COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))]) for o in spec.objects}
    background = spec.background or BACKGROUND_NAMES[rng.integers(len(BACKGROUND_NAMES))]
    for _ in range(max_tries):
        placed: list[SceneObject] = []
        ok = True
        for o in wanted:
            shape = o.shape or SHAPES[rng.integers(len(SHAPES))]
            colour = (shared[id(o)] if spec.task == "counting"
                      else (o.colour or COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))]))
            for _inner in range(50):
                cand = _place(shape, colour, o.position, rng, size, size_range)
                if all(separated(cand, p) for p in placed):
                    placed.append(cand)
                    break
            else:
                ok = False
                break
        if ok:
            return Scene(objects=tuple(placed), background=background, size=size, spec=spec)
    raise RuntimeError(f"could not place the objects of {spec} without overlap in {max_tries} tries")


def sample_free_scene(rng: np.random.Generator, size: int = IMAGE_SIZE) -> Scene:
    """A scene with 1-3 objects of any attributes (the recogniser's training distribution)."""
    k = int(rng.integers(1, 4))
    for _ in range(200):
        placed: list[SceneObject] = []
        for _i in range(k):
            shape = SHAPES[rng.integers(len(SHAPES))]
            colour = COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))]
            pos = POSITIONS[rng.integers(len(POSITIONS))] if rng.random() < 0.5 else None
            for _inner in range(50):
                cand = _place(shape, colour, pos, rng, size)
                if all(separated(cand, p) for p in placed):
                    placed.append(cand)
                    break
        if len(placed) == k:
            break
    background = BACKGROUND_NAMES[rng.integers(len(BACKGROUND_NAMES))]
    return Scene(objects=tuple(placed), background=background, size=size)


COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
BACKGROUND_NAMES: tuple[str, ...] = tuple(BACKGROUNDS)
