"""The world's vocabulary and the typed prompt specification shared by captions, renderer, judge and reward.

A `PromptSpec` is what a caption asks for (task + objects + count). The renderer draws a scene that satisfies
it, the captions grammar says it in words, the parser reads it back from words, the judge checks an image
against it, and the recogniser's reward scores the attributes it names.

The held-out split works on attribute combinations: each (task, attributes) tuple is assigned to `train` or
`heldout` by a hash, so a held-out combination (say "three purple triangles" or "a yellow square on the
left") never appears in the base model's training data, whatever its wording.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

# RGB in [0, 1]. Hues are spread (0, 30, 54, 128, 225, 276 degrees) so the judge can tell them apart.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.16, 0.16),
    "orange": (0.95, 0.55, 0.12),
    "yellow": (0.92, 0.84, 0.16),
    "green": (0.16, 0.70, 0.24),
    "blue": (0.16, 0.32, 0.88),
    "purple": (0.60, 0.24, 0.80),
}
# Neutral backgrounds only (zero chroma): see scenes.py for why.
BACKGROUNDS: dict[str, tuple[float, float, float]] = {
    "black": (0.08, 0.08, 0.08),
    "gray": (0.45, 0.45, 0.45),
    "white": (0.92, 0.92, 0.92),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "centre")
COUNTS: tuple[int, ...] = (1, 2, 3)
# The GenEval task split.
TASKS: tuple[str, ...] = ("single_object", "two_objects", "counting", "colours", "position", "colour_attr")
SPLITS: tuple[str, ...] = ("train", "heldout")
# Tasks whose attribute space is too small to hold combinations out (3 shapes; 3 shape pairs): their
# held-out prompts are new seeds and new wordings only.
_UNSPLIT_TASKS = frozenset({"single_object", "two_objects"})
_HELDOUT_FRACTION = 5  # 1 in 5 combinations is held out


@dataclass(frozen=True)
class ObjectSpec:
    shape: str | None = None
    colour: str | None = None
    position: str | None = None

    def __post_init__(self) -> None:
        if self.shape is not None and self.shape not in SHAPES:
            raise ValueError(f"ObjectSpec.shape={self.shape!r} is not one of {SHAPES}")
        if self.colour is not None and self.colour not in COLOURS:
            raise ValueError(f"ObjectSpec.colour={self.colour!r} is not one of {tuple(COLOURS)}")
        if self.position is not None and self.position not in POSITIONS:
            raise ValueError(f"ObjectSpec.position={self.position!r} is not one of {POSITIONS}")


@dataclass(frozen=True)
class PromptSpec:
    task: str
    objects: tuple[ObjectSpec, ...]
    count: int = 1
    background: str | None = None

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"PromptSpec.task={self.task!r} is not one of {TASKS}")
        if self.count not in COUNTS:
            raise ValueError(f"PromptSpec.count={self.count!r} is not one of {COUNTS}")
        if self.background is not None and self.background not in BACKGROUNDS:
            raise ValueError(f"PromptSpec.background={self.background!r} is not one of {tuple(BACKGROUNDS)}")
        expected = {"single_object": 1, "two_objects": 2, "counting": 1, "colours": 1, "position": 1, "colour_attr": 2}
        if len(self.objects) != expected[self.task]:
            raise ValueError(
                f"PromptSpec.objects has {len(self.objects)} entries; task {self.task!r} needs {expected[self.task]}"
            )

    def combination(self) -> tuple:
        """The attribute combination that the held-out split is defined on (wording and background excluded)."""
        return (self.task, self.count if self.task == "counting" else 1) + tuple(
            (o.shape, o.colour, o.position) for o in self.objects
        )

    def split(self) -> str:
        if self.task in _UNSPLIT_TASKS:
            return "train"
        digest = hashlib.sha256(repr(self.combination()).encode()).digest()
        return "heldout" if digest[0] % _HELDOUT_FRACTION == 0 else "train"


def all_specs(task: str) -> list[PromptSpec]:
    """Every attribute combination of a task (background left open), in a fixed order."""
    out: list[PromptSpec] = []
    if task == "single_object":
        out = [PromptSpec(task, (ObjectSpec(shape=s),)) for s in SHAPES]
    elif task == "two_objects":
        out = [
            PromptSpec(task, (ObjectSpec(shape=a), ObjectSpec(shape=b)))
            for i, a in enumerate(SHAPES)
            for b in SHAPES[i + 1 :]
        ]
    elif task == "counting":
        out = [
            PromptSpec(task, (ObjectSpec(shape=s, colour=c),), count=n) for n in COUNTS for c in COLOURS for s in SHAPES
        ]
    elif task == "colours":
        out = [PromptSpec(task, (ObjectSpec(shape=s, colour=c),)) for c in COLOURS for s in SHAPES]
    elif task == "position":
        out = [
            PromptSpec(task, (ObjectSpec(shape=s, colour=c, position=p),))
            for p in POSITIONS for c in COLOURS for s in SHAPES
        ]
    elif task == "colour_attr":
        cols, pairs = list(COLOURS), []
        for s1 in SHAPES:
            for s2 in SHAPES:
                if s1 >= s2:
                    continue
                for c1 in cols:
                    for c2 in cols:
                        if c1 != c2:
                            pairs.append(
                                PromptSpec(task, (ObjectSpec(shape=s1, colour=c1), ObjectSpec(shape=s2, colour=c2)))
                            )
        out = pairs
    else:
        raise ValueError(f"task={task!r} is not one of {TASKS}")
    return out


def specs_for_split(task: str, split: str) -> list[PromptSpec]:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {SPLITS}")
    specs = all_specs(task)
    if task in _UNSPLIT_TASKS:
        return specs
    return [s for s in specs if s.split() == split]
