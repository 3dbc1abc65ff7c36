"""Judge a backbone on the world: sample held-out prompts with fixed seeds, score with the analytic judge
(`judge_backbone`; the command is `python -m services.entrypoints.world.evaluate`).

Sample (prompt i, seed s) gets noise from seed 1000 * s + i, so two models compared with the same arguments
see the same noise, whatever the batch size. Diversity is measured across the seeds of each prompt.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from flowbp_core.eval import sample_batches
from flowbp_core.world.data import PromptItem, heldout_prompts
from flowbp_core.world.judge import JudgeReport, diversity, evaluate

def noise_for(backbone, n_prompts: int, seed: int) -> torch.Tensor:
    shape = backbone.latent_shape(1)[1:]
    return torch.stack(
        [torch.randn(shape, generator=torch.Generator().manual_seed(1000 * seed + i)) for i in range(n_prompts)]
    )


def sample_world_images(backbone, prompts: list[str], seed: int, n_steps: int | None = None, guidance=None,
                        batch_size: int = 64, noise: torch.Tensor | None = None,
                        progress: bool = False) -> torch.Tensor:
    """Images [B, 3, H, W] in [0, 1] on the CPU for `prompts`, sampled as the world was trained (the training
    schedule, `backbone.schedule`): noise per index from `seed` (`noise_for`), unless `noise` is given."""
    steps = n_steps or backbone.preset.n_steps
    noise = (noise if noise is not None else noise_for(backbone, len(prompts), seed)).to(backbone.device)
    batches = sample_batches(backbone, prompts, lambda start, end: noise[start:end],
                             sigmas=backbone.schedule(steps).sigmas, guidance=guidance, batch_size=batch_size,
                             progress=progress)
    return torch.cat([images.cpu() for images, _, _ in batches])


@dataclass
class WorldEval:
    report: JudgeReport
    images: torch.Tensor  # [n_seeds * n_prompts, 3, H, W], seed-major
    prompts: list[str]  # aligned with images
    seconds: float

    def as_dict(self) -> dict:
        return {**self.report.as_dict(), "seconds": round(self.seconds, 2)}


def judge_backbone(backbone, items: list[PromptItem] | None = None, seeds: int = 2, n_steps: int | None = None,
                   guidance=None) -> WorldEval:
    items = items if items is not None else heldout_prompts()
    texts = [it.text for it in items]
    t0 = time.perf_counter()
    imgs = torch.cat([sample_world_images(backbone, texts, seed=s, n_steps=n_steps, guidance=guidance)
                      for s in range(seeds)])
    all_specs = [it.spec for it in items] * seeds
    report = evaluate(imgs, all_specs)
    if seeds > 1:
        report.diversity = diversity(imgs, list(range(len(items))) * seeds)
    return WorldEval(report=report, images=imgs, prompts=texts * seeds, seconds=time.perf_counter() - t0)
