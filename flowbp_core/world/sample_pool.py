"""Sample the generator's own images for the recogniser to learn from (on-policy reward data): `sample_pool(options)`;
the command is `python -m services.entrypoints.world.sample_pool` (`--policy runs/<id>/step_<n>` applies a FlowBP
checkpoint's LoRA first: `backbones.embedded.load_policy`).

Why: a recogniser trained only on crisp renders is fooled by what a generator draws (blocky textures, bloated
blobs), and alignment finds those holes within tens of steps. Training it also on the generator's samples,
labelled by what is actually in them (`train_reward --generated`), closes the holes the policy reaches.
Prompts come from the *training* split only, with their own noise seeds, so the held-out evaluation prompts
and noise never enter the reward's data. Images are stored as uint8 [N, 3, 32, 32] with the prompts and the
policy in the file's metadata.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flowbp_core.errors import ConfigError, check_range
from flowbp_core.world.data import prompt_pool
from flowbp_core.world.evaluate import sample_world_images


@dataclass(frozen=True, kw_only=True)
class SamplePoolOptions:
    """One pool of generated images; each field is a `--flag` of the command, its help says what it is."""

    out: Path = field(metadata={"help": "output .safetensors"})
    n: int = field(default=6000, metadata={"help": "number of images"})
    policy: Path | None = field(default=None, metadata={"help": "FlowBP checkpoint folder whose LoRA to sample with"})
    seed: int = field(default=7, metadata={"help": "prompt and noise seed (held-out noise uses 1000*s+i)"})
    per_prompt: int = field(default=1, metadata={
        "help": "samples per prompt, 1..16 (several give the preference model pairs of one prompt)"})
    batch: int = field(default=128, metadata={"help": "images per sampling batch"})
    threads: int = field(default=0, metadata={"help": "torch threads (0: torch default)"})

    def __post_init__(self) -> None:
        if self.n <= 0:
            raise ConfigError("n", self.n, "a positive integer")
        check_range("per_prompt", self.per_prompt, 1, 16)


def sample_pool(a: SamplePoolOptions, bb: Any) -> dict:
    """Sample backbone `bb` (the policy `a.policy` names, loaded by the caller: the world package builds no
    backbone) and save the pool; returns {"out", "n", "seconds"}."""
    if a.threads:
        torch.set_num_threads(a.threads)
    from safetensors.torch import save_file

    items = prompt_pool("train", -(-a.n // a.per_prompt), seed=10_000 + a.seed)
    prompts = [it.text for it in items for _ in range(a.per_prompt)][: a.n]  # a prompt's samples side by side
    shape = bb.latent_shape(1)[1:]
    gen = torch.Generator().manual_seed(50_000 + a.seed)  # far from the evaluation seeds
    noise = torch.cat([torch.randn((len(prompts[s : s + a.batch]), *shape), generator=gen)
                       for s in range(0, len(prompts), a.batch)])
    t0 = time.perf_counter()
    images = sample_world_images(bb, prompts, seed=0, batch_size=a.batch, noise=noise, progress=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({"images": (images.clamp(0, 1) * 255).round().to(torch.uint8)}, str(a.out),
              metadata={"prompts": json.dumps(prompts), "policy": str(a.policy or "base"), "seed": str(a.seed),
                        "per_prompt": str(a.per_prompt)})
    return {"out": str(a.out), "n": len(prompts), "seconds": round(time.perf_counter() - t0, 1)}
