"""Prompt pools drawn from the grammar: (spec, caption) pairs for one split, deterministic by seed."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from flowbp_core.world.captions import caption
from flowbp_core.world.spec import BACKGROUNDS, TASKS, PromptSpec, specs_for_split

_BG_NAMES = tuple(BACKGROUNDS)


@dataclass(frozen=True)
class PromptItem:
    spec: PromptSpec
    text: str


def prompt_pool(split: str, n: int, seed: int, tasks: tuple[str, ...] = TASKS, background_prob: float = 0.25) -> list[PromptItem]:
    """`n` prompts of `split`, tasks in equal shares (task-cyclic order), wordings drawn by `seed`.

    Each task walks through a seeded permutation of its combinations (and again, reshuffled, when it runs out),
    so a pool covers the combinations evenly instead of repeating some and missing others.
    """
    rng = np.random.default_rng(seed)
    per_task = {t: specs_for_split(t, split) for t in tasks}
    order: dict[str, list[int]] = {t: [] for t in tasks}
    items: list[PromptItem] = []
    for i in range(n):
        task = tasks[i % len(tasks)]
        if not order[task]:
            order[task] = list(rng.permutation(len(per_task[task])))
        spec = per_task[task][int(order[task].pop())]
        if rng.random() < background_prob:
            spec = replace(spec, background=_BG_NAMES[int(rng.integers(len(_BG_NAMES)))])
        items.append(PromptItem(spec=spec, text=caption(spec, rng)))
    return items


def heldout_prompts(n_per_task: int = 8, seed: int = 1234) -> list[PromptItem]:
    """The fixed evaluation set: held-out combinations (new seeds/wordings for the two unsplit tasks)."""
    return prompt_pool("heldout", n_per_task * len(TASKS), seed=seed, background_prob=0.0)


def train_prompts(n: int = 64, seed: int = 7) -> list[PromptItem]:
    """Alignment prompts: training-split combinations only (the held-out split measures generalisation)."""
    return prompt_pool("train", n, seed=seed, background_prob=0.0)
