"""`make demo`: align the embedded model with FlowBP-Sparse to a learned preference model and show what changed.

    python -m services.entrypoints.demo [--quick] [--reward preference|attributes] [--runtime ray|core] [--out runs]
        [--section.field=value ...]

The run is deploy/configs/demo.yaml, a RunConfig like any other run file: `--train.steps=60`, `--train.lr=3e-3`,
`--backbone.pretrained=<transformer.safetensors>` or `--reward.terms.0.kwargs.smoothing_sigma=0.1` change it, as
they do for `services.entrypoints.train`, and are checked by the same schema. `--quick` and `--reward attributes`
are named sets of such overrides (QUICK, REWARDS), applied before the command line's own.

1. Loads the committed base model (a small SD3 transformer in pixel space + MiniLM) and the reward: the learned
   preference model (`world_preference`) plus the attribute recogniser's term that defends prompt following
   (default), or the recogniser alone (`--reward attributes`).
2. Samples the base model on held-out prompts (attribute combinations it never saw in training) with fixed
   noise, and scores the samples with the analytic rater (taste: global and local parts) and judge (prompt
   following); neither is the reward.
3. Trains a LoRA with FlowBP-Sparse: through the Ray runtime (local Ray on 127.0.0.1: rollout worker, Ray
   Train learner) by default, or through the single-process core loop (`--runtime core`, also the fallback
   when Ray is not installed). A progress bar shows reward and step time.
4. Samples the aligned model with the same prompts and noise, prints base vs aligned (rater, its parts, judge,
   diversity, each change with a paired 95 % interval), and writes runs/<run_id>/: metrics.jsonl,
   reward_curve.png, before_after.png, demo_summary.json, the LoRA (step_*/lora).
`--quick` (CI) runs a few steps on a smaller batch and eval set.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from flowbp_core.config import RunConfig, load_config
from flowbp_core.errors import ConfigError, check_range
from flowbp_core.run import run_stamp
from services.entrypoints import demo_report

RUN_FILE = Path(__file__).resolve().parents[2] / "deploy" / "configs" / "demo.yaml"
# A CI-sized run: a few steps on a smaller batch and LoRA.
QUICK = ("train.steps=3", "train.batch_size=4", "backbone.lora.rank=4")
REWARDS = {
    "preference": (),
    # The attribute reward is a mean log-probability (<= 0). The hinge stops pushing samples the recogniser is
    # already ~95 % sure of (r > -0.05), which limits reward hacking on easy prompts. Its rate and penalty are the
    # ones its results were measured with (flowbp_core/world/README.md), not the preference task's.
    "attributes": ("reward.terms=[{name: world_attributes, kwargs: {aesthetic_weight: 0.0}}]", "reward.loss=hinge",
                   "reward.clip=-0.05", "train.lr=1e-3", "train.velocity_penalty=0"),
}


@dataclass(frozen=True, kw_only=True)
class DemoEval:
    """The demo's own before/after evaluation (not training config).

    Attributes:
        per_task: held-out prompts per task (6 tasks) sampled before and after, 1..64.
        seeds: noise seeds per held-out prompt, 1..16.
    """

    per_task: int
    seeds: int

    def __post_init__(self) -> None:
        check_range("eval_per_task", self.per_task, 1, 64)
        check_range("eval_seeds", self.seeds, 1, 16)


# 48 held-out prompts x 2 seeds resolve the rater's gain of tens of points; the judge's interval is about +-8.
FULL_EVAL = DemoEval(per_task=8, seeds=2)
QUICK_EVAL = DemoEval(per_task=2, seeds=1)


def demo_config(overrides: Sequence[str], *, out_root: Path, run_id: str, threads: int = 1,
                run_file: Path = RUN_FILE) -> RunConfig:
    """The demo's run: the run file with `overrides`, then what the demo sets itself: its run folder, one checkpoint
    at the end, and all `threads` for each role (in sync mode the rollout worker and the learner take turns, and the
    local Ray declares CPUs for both: `local_ray_cpus`)."""
    cfg = load_config(run_file, list(overrides))
    cfg.run_id = run_id
    cfg.checkpoint.dir = str(out_root)
    cfg.checkpoint.every = cfg.train.steps
    cfg.runtime.rollout_num_cpus = cfg.runtime.learner_num_cpus = float(threads)
    return cfg


# ------------------------------------------------------------------------------------------- the two runtimes
def ray_available() -> bool:
    try:
        import ray  # noqa: F401

        from services.runtime import driver  # noqa: F401
    except ImportError:
        return False
    return True


def run_core(cfg: RunConfig, run_dir: Path, comp, bar) -> list[dict]:
    from flowbp_core.run import train_loop

    rows: list[dict] = []

    def on_step(res) -> None:
        step_s = sum(res.timings.values())
        rows.append({"step": res.step, "reward": res.reward_mean, "step_s": step_s, "skipped": res.skipped})
        bar.set_postfix(reward=f"{res.reward_mean:.3f}", step_s=f"{step_s:.1f}")
        bar.update(1)

    train_loop(cfg, run_dir=run_dir, comp=comp, on_step=on_step)
    return rows


def local_ray_cpus(cfg: RunConfig) -> float:
    """Logical CPUs of the demo's local Ray: the rollout worker, the learner and the served score deployment
    together (more than the machine's cores: in sync mode the first two never run at once)."""
    rt = cfg.runtime
    return rt.rollout_workers * rt.rollout_num_cpus + rt.learners * rt.learner_num_cpus + cfg.reward.served.num_cpus


def run_ray(cfg: RunConfig, run_dir: Path, bar) -> list[dict]:
    from services.localproc import apply_ray_env, init_local_ray

    apply_ray_env()
    import logging

    import ray

    from services.runtime.driver import Driver

    # Serve and Train log every deployment step at INFO; the progress bar is what a newcomer should see.
    for name in ("ray", "ray.serve", "ray.train", "flowbp.runtime"):
        logging.getLogger(name).setLevel(logging.WARNING)

    started = False
    if not ray.is_initialized():
        init_local_ray(num_cpus=math.ceil(local_ray_cpus(cfg)), object_store_mb=256, log_to_driver=False,
                       configure_logging=False)
        started = True
    driver = Driver(cfg, run_id=cfg.run_id)
    box: dict = {}

    def target() -> None:
        try:
            box["summary"] = driver.run()
        except BaseException as e:  # noqa: BLE001 - re-raised below in the main thread
            box["error"] = e

    th = threading.Thread(target=target, name="demo-driver", daemon=True)
    th.start()
    rows: list[dict] = []
    last_t = time.perf_counter()
    try:
        while th.is_alive() or len(rows) < len(driver.summary.rewards):
            th.join(timeout=0.5)
            rewards = dict(driver.summary.rewards)
            for step in sorted(k for k in rewards if k >= len(rows)):
                now = time.perf_counter()
                rows.append({"step": step, "reward": rewards[step], "step_s": now - last_t, "skipped": False})
                last_t = now
                bar.set_postfix(reward=f"{rewards[step]:.3f}", step_s=f"{rows[-1]['step_s']:.1f}")
                bar.update(1)
            if not th.is_alive():
                break
    finally:
        if started:
            ray.shutdown()
    if "error" in box:
        raise box["error"]
    if not (run_dir / "metrics.jsonl").exists():
        with open(run_dir / "metrics.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return rows


# ---------------------------------------------------------------------------------------------------- main
def new_run_dir(root: Path, stem: str) -> Path:
    """A run folder of its own: `stem`, or `stem-2`, `stem-3`, ... when another demo took it (two demos started in
    the same second would otherwise write one folder, and the Ray path would load the other run's LoRA)."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(1, 10_000):
        d = root / (stem if i == 1 else f"{stem}-{i}")
        try:
            d.mkdir()  # atomic: exactly one process creates it
            return d
        except FileExistsError:
            continue
    raise RuntimeError(f"no free run folder for {stem!r} under {root}")


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """The demo's own flags, and the `--section.field=value` overrides of its run."""
    p = argparse.ArgumentParser(prog="python -m services.entrypoints.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=RUN_FILE, help="the run file (default: deploy/configs/demo.yaml)")
    p.add_argument("--quick", action="store_true", help=f"a CI-sized run: {' '.join(QUICK)}, a small eval set")
    p.add_argument("--reward", choices=tuple(REWARDS), default="preference",
                   help="preference: align to the learned preference model (default); attributes: to the attribute "
                        "recogniser (prompt following)")
    p.add_argument("--runtime", choices=("auto", "ray", "core"), default="auto",
                   help="ray: the Ray runtime on a local loopback cluster; core: the single-process loop "
                        "(auto: ray when installed, core for --quick)")
    p.add_argument("--eval-per-task", type=int, default=None,
                   help=f"held-out prompts per task (6 tasks) sampled before and after, 1..64 "
                        f"(default {FULL_EVAL.per_task}, quick {QUICK_EVAL.per_task})")
    p.add_argument("--eval-seeds", type=int, default=None,
                   help=f"noise seeds per held-out prompt, 1..16 (default {FULL_EVAL.seeds}, quick {QUICK_EVAL.seeds})")
    p.add_argument("--out", type=Path, default=Path("runs"), help="runs root folder")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads, 1..64 (default: up to 2)")
    a, rest = p.parse_known_args(argv)
    for item in rest:
        if not item.startswith("--") or "=" not in item:
            p.error(f"unrecognised argument {item!r}: overrides of the run look like --section.field=value")
    if a.threads is not None and not 1 <= a.threads <= 64:
        p.error(f"--threads={a.threads}: allowed range is 1..64")
    return a, [item[2:] for item in rest]


def main(argv: list[str] | None = None) -> int:
    a, overrides = parse_args(argv)
    torch.set_num_threads(a.threads or max(1, min(2, os.cpu_count() or 1)))
    defaults = QUICK_EVAL if a.quick else FULL_EVAL
    run_dir = None
    try:
        ev = DemoEval(per_task=defaults.per_task if a.eval_per_task is None else a.eval_per_task,
                      seeds=defaults.seeds if a.eval_seeds is None else a.eval_seeds)
        named = [*(QUICK if a.quick else ()), *REWARDS[a.reward]]
        load_config(a.config, [*named, *overrides])  # checked before a run folder is made
        run_dir = new_run_dir(a.out.absolute(), f"demo-{run_stamp()}{'-quick' if a.quick else ''}")
        cfg = demo_config([*named, *overrides], out_root=a.out.absolute(), run_id=run_dir.name,
                          threads=torch.get_num_threads(), run_file=a.config)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    runtime = a.runtime
    if runtime == "auto":
        runtime = "core" if a.quick or not ray_available() else "ray"
    elif runtime == "ray" and not ray_available():
        print("Ray runtime not available (services.runtime or ray missing): running the core loop", file=sys.stderr)
        runtime = "core"
    run_id = run_dir.name
    t_start = time.perf_counter()

    from tqdm import tqdm

    from flowbp_core.checkpoint import latest_complete, load_checkpoint
    from flowbp_core.run import build_components
    from flowbp_core.world.data import heldout_prompts
    from flowbp_core.world.evaluate import judge_backbone

    n_steps = cfg.sampling.n_steps
    reward = demo_report.reward_label(cfg.reward.terms)
    print(f"FlowBP demo: embedded model, FlowBP-Sparse, reward {reward}, runtime={runtime}, "
          f"{cfg.train.steps} steps x {cfg.train.batch_size} prompts, {n_steps} sampling steps", flush=True)
    try:
        comp = build_components(cfg)  # the committed base model + LoRA (zero-initialised: still the base model)
    except (ConfigError, ValueError, FileNotFoundError) as e:  # a reward option or a base file the schema can't see
        print(f"config error: {e}", file=sys.stderr)
        return 2
    items = heldout_prompts(ev.per_task)
    print(f"sampling the base model on {len(items)} held-out prompts x {ev.seeds} seeds ...", flush=True)
    base = judge_backbone(comp.backbone, items, seeds=ev.seeds, n_steps=n_steps)

    bar = tqdm(total=cfg.train.steps, desc="aligning", unit="step", file=sys.stdout, dynamic_ncols=True)
    if runtime == "ray":
        rows = run_ray(cfg, run_dir, bar)
        ckpt = latest_complete(run_dir)
        if ckpt is None:
            raise RuntimeError(f"the Ray run finished without a complete checkpoint under {run_dir}")
        comp.backbone.load_trainable_state_dict(load_checkpoint(ckpt).trainable)
    else:
        rows = run_core(cfg, run_dir, comp, bar)
    bar.close()
    print("sampling the aligned model with the same prompts and noise ...", flush=True)
    aligned = judge_backbone(comp.backbone, items, seeds=ev.seeds, n_steps=n_steps)

    comparison, rated = demo_report.compare(base, aligned, items, ev.seeds)
    demo_report.write_figures(rows, base, aligned, rated, len(items), run_dir, reward)
    ckpt = latest_complete(run_dir)
    summary = {
        "run_id": run_id, "runtime": runtime, "reward": cfg.reward.terms[0].name, "config": cfg.to_dict(),
        "eval": asdict(ev), **comparison,
        "reward_first": rows[0]["reward"] if rows else None, "reward_last": rows[-1]["reward"] if rows else None,
        "lora": str(ckpt / "lora") if ckpt is not None and (ckpt / "lora").exists() else None,
        "wall_seconds": round(time.perf_counter() - t_start, 1),
    }
    (run_dir / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    demo_report.print_report(summary, base.report, aligned.report, rated, rows, len(items), ev.seeds)
    print(f"run folder: {run_dir}  ({summary['wall_seconds']:.0f} s)")
    for name in ("metrics.jsonl", "reward_curve.png", "before_after.png", "demo_summary.json"):
        print(f"  {name}")
    if summary["lora"]:
        print(f"  LoRA: {summary['lora']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
