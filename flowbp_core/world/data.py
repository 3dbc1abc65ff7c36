"""Prompt pools drawn from the grammar: (spec, caption) pairs for one split, deterministic by seed; and the
base model's training batches (rendered scenes for a pool's captions), deterministic by (seed, step)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from flowbp_core.world.captions import caption
from flowbp_core.world.scenes import render_batch, sample_scene
from flowbp_core.world.spec import BACKGROUNDS, TASKS, PromptSpec, specs_for_split

_BG_NAMES = tuple(BACKGROUNDS)


@dataclass(frozen=True)
class PromptItem:
    spec: PromptSpec
    text: str


def prompt_pool(
    split: str, n: int, seed: int, tasks: tuple[str, ...] = TASKS, background_prob: float = 0.25
) -> list[PromptItem]:
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


@dataclass
class Batch:
    """One step's training data, drawn on the CPU (in a render worker when there are any)."""

    index: torch.Tensor  # [B] caption indices into the pool
    drop: torch.Tensor  # [B] bool: caption replaced by "" (for classifier-free guidance)
    x: torch.Tensor  # [B, 3, 32, 32] images in [-1, 1]
    noise: torch.Tensor  # [B, 3, 32, 32]
    sigma: torch.Tensor  # [B] logit-normal(0, 1)


def draw_batch(pool, seed: int, step: int, batch: int) -> Batch:
    rng = np.random.default_rng([seed, step])
    idx = rng.integers(len(pool), size=batch)
    scenes = [sample_scene(pool[i].spec, rng) for i in idx]
    x = torch.from_numpy(render_batch(scenes)) * 2.0 - 1.0
    drop = torch.from_numpy(rng.random(batch) < 0.1)
    sigma = torch.sigmoid(torch.from_numpy(rng.standard_normal(batch)).float())
    noise = torch.from_numpy(rng.standard_normal(x.shape)).float()
    return Batch(torch.from_numpy(idx), drop, x, noise, sigma)


class _BatchStream(torch.utils.data.IterableDataset):
    """Batches for steps start, start+1, ...; worker w of W draws the steps congruent to w mod W, and the
    DataLoader interleaves workers round-robin, so the order is the steps' order."""

    def __init__(self, pool, seed: int, start: int, batch: int) -> None:
        self.pool, self.seed, self.start, self.batch = pool, seed, start, batch

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, n = (info.id, info.num_workers) if info else (0, 1)
        step = self.start + w
        while True:
            yield draw_batch(self.pool, self.seed, step, self.batch)
            step += n


def batch_stream(pool, seed: int, start: int, batch: int, workers: int):
    """The base model's training batches for steps start, start+1, ... (endless); `workers` > 0 renders them
    in that many processes, with the same result."""
    stream = _BatchStream(pool, seed, start, batch)
    if workers == 0:
        return iter(stream)  # outside a DataLoader it draws every step itself
    return iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers, prefetch_factor=4,
                                            persistent_workers=False))
