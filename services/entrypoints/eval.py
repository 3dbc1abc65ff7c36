"""Evaluation command: generate images for a prompt set without gradients, score them with several rewards, and
write a table (markdown + JSON) and an image grid (the parts are flowbp_core.eval's).

    python -m services.entrypoints.eval --backbone sd3 --pretrained /models/sd35m --lora runs/<id>/step_400 \\
        --prompts hpdv2 --rewards hpsv2,pickscore,imagereward \\
        --reward-arg hpsv2.checkpoint=/models/HPS_v2.1_compressed.pt --reward-arg hpsv2.tokenizer=/models/clip-h \\
        --reward-arg pickscore.path=/models/PickScore_v1 ... --out eval/sd35_step400 --steps 40 --seed 42

Each prompt i gets its own noise seed (seed + i), so a score does not depend on the batch size or on --limit, and
two checkpoints evaluated with the same seed see the same noise. `--lora` takes a FlowBP checkpoint (a
`runs/<id>/step_<n>` folder or the run folder, whose latest complete step is used) holding LoRA or full
fine-tuned weights; the backbone is then built as the checkpoint's config says.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from flowbp_core.errors import ConfigError
from flowbp_core.eval import (build_rewards, evaluate_images, generate, load_backbone, markdown_table,
                              parse_reward_args)
from flowbp_core.presets import eval_steps as paper_eval_steps
from flowbp_core.run import load_prompts


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m services.entrypoints.eval", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", required=True, help="registered backbone: embedded, sd3, flux1, flux2")
    ap.add_argument("--pretrained", help="hub id or local folder of the base model (default: the backbone's own)")
    ap.add_argument("--tiny", action="store_true", help="tiny random backbone (smoke tests)")
    ap.add_argument("--lora", "--checkpoint", dest="checkpoint",
                    help="FlowBP checkpoint folder (runs/<id>/step_<n>, or the run folder for its latest step)")
    ap.add_argument("--ema", action="store_true", default=None,
                    help="evaluate the checkpoint's EMA weights (the default when it has them; an error if not)")
    ap.add_argument("--no-ema", dest="ema", action="store_false", help="evaluate the live (non-EMA) weights")
    ap.add_argument("--prompts", default="hpdv2",
                    help="hpdv2, geneval, world_train, world_heldout, or a .txt / .jsonl file")
    ap.add_argument("--rewards", required=True, help="comma-separated reward names, e.g. hpsv2,pickscore")
    ap.add_argument("--reward-arg", action="append", default=[], metavar="NAME.KEY=VALUE",
                    help="keyword argument of a reward's builder (repeatable), e.g. pickscore.path=/models/pick")
    ap.add_argument("--out", required=True, help="output folder: scores.md, scores.json, grid.png, images/")
    ap.add_argument("--limit", type=int, help="first N prompts only")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int,
                    help="sampling steps (default: the paper's, 40 for sd3 and 50 for flux1/flux2; else the preset's)")
    ap.add_argument("--guidance", type=float, help="guidance scale (default: the backbone preset's)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--grid", type=int, default=16, help="images in grid.png")
    ap.add_argument("--no-images", action="store_true", help="do not save one PNG per prompt")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    try:
        if args.batch_size < 1:
            raise ConfigError("--batch-size", args.batch_size, "an integer >= 1")
        if args.limit is not None and args.limit < 1:
            raise ConfigError("--limit", args.limit, "an integer >= 1")
        if args.steps is not None and args.steps < 1:
            raise ConfigError("--steps", args.steps, "an integer >= 1")
        names = [n.strip() for n in args.rewards.split(",") if n.strip()]
        if not names:
            raise ConfigError("--rewards", args.rewards, "at least one reward name")
        prompts = load_prompts(args.prompts, args.limit)
        t0 = time.perf_counter()
        rewards = build_rewards(names, parse_reward_args(args.reward_arg, names), args.device)
        backbone = load_backbone(args.backbone, args.pretrained, args.checkpoint, tiny=args.tiny, seed=args.seed,
                                 dtype=args.dtype, device=args.device, ema=args.ema)
        t_load = time.perf_counter() - t0
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    steps = args.steps or paper_eval_steps(args.backbone) or backbone.preset.n_steps
    guidance = args.guidance if args.guidance is not None else backbone.preset.guidance.scale
    t0 = time.perf_counter()
    try:
        report = evaluate_images(
            generate(backbone, prompts, batch_size=args.batch_size, steps=steps, seed=args.seed,
                     guidance_scale=args.guidance),
            rewards, Path(args.out), prompts_name=args.prompts, total=len(prompts), seed=args.seed,
            save_images=not args.no_images, grid_size=args.grid, progress=not args.no_progress,
            meta={"backbone": args.backbone, "pretrained": args.pretrained, "checkpoint": args.checkpoint,
                  "steps": steps, "guidance": guidance, "seconds": {"load": t_load}})
    except ConfigError as e:  # e.g. a prompt the efficientnet reward cannot score
        print(f"error: {e}", file=sys.stderr)
        return 2
    report.seconds["total"] = time.perf_counter() - t0
    (Path(args.out) / "scores.json").write_text(report.to_json())
    (Path(args.out) / "scores.md").write_text(markdown_table(report))
    print(markdown_table(report, max_rows=0))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
