"""Judge a backbone on the world: sample held-out prompts with fixed seeds, score with the analytic judge.

    python -m services.entrypoints.world.evaluate [--checkpoint PATH] [--per-task 16] [--seeds 2]

Sample (prompt i, seed s) gets noise from seed 1000 * s + i, so two models compared with the same arguments see
the same noise (flowbp_core.world.evaluate.judge_backbone).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m services.entrypoints.world.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="transformer.safetensors (default: the committed base model)")
    p.add_argument("--per-task", type=int, default=16)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--split", choices=("heldout", "train"), default="heldout")
    a = p.parse_args(argv)
    from flowbp_core.backbones.embedded import EmbeddedBackbone
    from flowbp_core.world.data import heldout_prompts, prompt_pool
    from flowbp_core.world.evaluate import judge_backbone
    from flowbp_core.world.spec import TASKS

    bb = EmbeddedBackbone.from_pretrained(a.checkpoint) if a.checkpoint else EmbeddedBackbone.default()
    items = (heldout_prompts(a.per_task) if a.split == "heldout"
             else prompt_pool("train", a.per_task * len(TASKS), seed=99, background_prob=0.0))
    ev = judge_backbone(bb, items, seeds=a.seeds, n_steps=a.steps)
    print(json.dumps(ev.as_dict(), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
