"""`make demo`: align the embedded model with FlowBP-Sparse to a learned preference model and show what changed.

    python -m services.entrypoints.demo [--quick] [--reward preference|attributes] [--runtime ray|core] [--out runs]

1. Loads the committed base model (a small SD3 transformer in pixel space + MiniLM) and the reward: the learned
   preference model (`world_preference`, default) or the attribute recogniser (`--reward attributes`).
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
from dataclasses import dataclass
from pathlib import Path

import torch

from flowbp_core.config import (BackboneSpec, CheckpointSpec, EvalSpec, LoRASpec, MethodSpec, PromptSource,
                                RewardSpec, RewardTerm, RunConfig, RuntimeSpec, SamplingSpec, ServedRewardSpec,
                                TrainSpec)


@dataclass(frozen=True)
class DemoSettings:
    steps: int
    batch: int
    n_steps: int
    per_task: int  # held-out prompts per task for the judge
    seeds: int
    lr: float
    rank: int
    aesthetic: float = 0.0  # weight of the weight-free crispness term in the reward
    recogniser: str | None = None  # reward checkpoint (default: the committed one)
    smoothing: float = 0.0  # reward's randomised-smoothing noise sigma (0: off)
    gradient_blur: float = 0.0  # sigma (pixels) of the low-pass on the reward's pixel gradient (0: off)
    contrastive: int = 0  # reward's negative prompts (0: the plain attribute log-probability)
    base: str | None = None  # base model checkpoint (default: the committed one)
    reward: str = "preference"  # "preference": the learned preference model; "attributes": the recogniser
    attributes_weight: float = 0.0  # with reward "preference": weight of the recogniser's term added to it


# 40 steps x 8 prompts at lr 1e-3 and 10 sampling steps (world README, Results): the rater's gain is tens of
# points, so 48 held-out prompts x 2 seeds resolve it; the judge's interval on them is about +-8 points.
FULL = DemoSettings(steps=40, batch=8, n_steps=10, per_task=8, seeds=2, lr=1e-3, rank=8)
QUICK = DemoSettings(steps=3, batch=4, n_steps=10, per_task=2, seeds=1, lr=1e-3, rank=4)


def _reward_kwargs(s: DemoSettings) -> dict:
    kw: dict = {"aesthetic_weight": s.aesthetic}
    if s.recogniser:
        kw["checkpoint"] = s.recogniser
    if s.smoothing:
        kw["smoothing_sigma"] = s.smoothing
    if s.gradient_blur:
        kw["gradient_blur"] = s.gradient_blur
    if s.contrastive:
        kw["contrastive_negatives"] = s.contrastive
    return kw


def demo_reward(s: DemoSettings) -> RewardSpec:
    # `served.num_cpus` sizes a Serve deployment of the reward, which the Ray runtime makes only for in-run
    # evaluation (off in the demo) or a served placement; the local Ray counts it in all the same.
    served = ServedRewardSpec(num_cpus=0.25)
    if s.reward == "preference":
        # The preference model's score is a choice logit with no ceiling: every sample keeps a gradient.
        terms = [RewardTerm(name="world_preference")]
        if s.attributes_weight:  # prompt following kept by the recogniser's term beside the taste
            terms.append(RewardTerm(name="world_attributes", weight=s.attributes_weight))
        return RewardSpec(terms=terms, loss="neg_mean", served=served)
    # The attribute reward is a mean log-probability (<= 0). The hinge stops pushing samples the recogniser is
    # already ~95 % sure of (r > -0.05), which limits reward hacking on easy prompts.
    return RewardSpec(terms=[RewardTerm(name="world_attributes", kwargs=_reward_kwargs(s))], loss="hinge", clip=-0.05,
                      served=served)


def demo_config(s: DemoSettings, out_root: Path, run_id: str, seed: int = 0, threads: int = 1) -> RunConfig:
    """The demo's run. In sync mode the rollout worker and the learner take turns, so each is given all `threads`
    (its torch threads follow its CPUs) and the local Ray declares CPUs for both (`local_ray_cpus`)."""
    return RunConfig(
        run_id=run_id,
        backbone=BackboneSpec(name="embedded", pretrained=s.base, device="cpu", finetune="lora",
                              lora=LoRASpec(rank=s.rank)),
        # The paper's SD3.5 preset (K=4, late_bias=1, gamma=0.5): the embedded model is an SD3 transformer.
        method=MethodSpec(name="flowbp_sparse", preset="sd35"),
        reward=demo_reward(s),
        sampling=SamplingSpec(n_steps=s.n_steps),
        train=TrainSpec(steps=s.steps, batch_size=s.batch, lr=s.lr, seed=seed, prompts=PromptSource(set="world_train")),
        checkpoint=CheckpointSpec(dir=str(out_root), every=s.steps, keep=1, resume=False),
        runtime=RuntimeSpec(rollout_workers=1, rollout_num_cpus=float(threads), learner_num_cpus=float(threads),
                            mode="sync"),
        eval=EvalSpec(limit=0),  # the demo evaluates 96 held-out samples itself: no in-run eval, no score app
    )


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


# ---------------------------------------------------------------------------------------------- artefacts
def reward_curve_png(rows: list[dict], path: Path, reward_name: str = "world_preference") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    vals = [r["reward"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    ax.plot(steps, vals, color="#9bb", lw=1, label="batch mean")
    if len(vals) >= 5:
        w = max(3, len(vals) // 10)
        smooth = [sum(vals[max(0, i - w + 1) : i + 1]) / len(vals[max(0, i - w + 1) : i + 1]) for i in range(len(vals))]
        ax.plot(steps, smooth, color="#036", lw=2, label=f"moving mean ({w})")
    ax.set_xlabel("step")
    ax.set_ylabel(f"{reward_name} reward (batch mean)")
    ax.set_title("FlowBP-Sparse on the embedded model")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def before_after_png(base_imgs: torch.Tensor, aligned_imgs: torch.Tensor, prompts: list[str], base_ok: list[bool],
                     aligned_ok: list[bool], path: Path, rows: int = 12, scale: int = 4,
                     scores: tuple[list[float], list[float]] | None = None) -> None:
    """Rows of (prompt | base | aligned), the same noise in a row; a green or red bar under each image says what
    the judge found, and the number beside it is the rater's score."""
    from PIL import Image, ImageDraw

    rows = min(rows, len(prompts))
    cell = 32 * scale
    text_w, pad = 270, 6
    score_w = 40 if scores else 0
    w = text_w + 2 * (cell + pad + score_w) + pad
    h = 24 + rows * (cell + 8 + pad)
    canvas = Image.new("RGB", (w, h), (250, 250, 250))
    draw = ImageDraw.Draw(canvas)
    draw.text((text_w + pad, 6), "base", fill=(0, 0, 0))
    draw.text((text_w + cell + 2 * pad + score_w, 6), "aligned", fill=(0, 0, 0))
    for r in range(rows):
        y = 24 + r * (cell + 8 + pad)
        draw.text((6, y + cell // 2 - 6), prompts[r][:44], fill=(20, 20, 20))
        for c, (imgs, ok) in enumerate(((base_imgs, base_ok), (aligned_imgs, aligned_ok))):
            arr = (imgs[r].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
            tile = Image.fromarray(arr).resize((cell, cell), Image.NEAREST)
            x = text_w + pad + c * (cell + pad + score_w)
            canvas.paste(tile, (x, y))
            draw.rectangle([x, y + cell + 2, x + cell, y + cell + 6], fill=(40, 170, 60) if ok[r] else (210, 50, 40))
            if scores:
                draw.text((x + cell + 4, y + cell // 2 - 6), f"{scores[c][r]:.0f}", fill=(20, 20, 20))
    canvas.save(path)


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m services.entrypoints.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a CI-sized run (a few steps, small eval)")
    p.add_argument("--reward", choices=("preference", "attributes"), default="preference",
                   help="preference: align to the learned preference model (default); attributes: to the attribute "
                        "recogniser (prompt following)")
    p.add_argument("--runtime", choices=("auto", "ray", "core"), default="auto",
                   help="ray: the Ray runtime on a local loopback cluster; core: the single-process loop "
                        "(auto: ray when installed, core for --quick)")
    p.add_argument("--steps", type=int, default=None, help="alignment steps (default 60, quick 3)")
    p.add_argument("--batch", type=int, default=None, help="prompts per alignment step, 1..256 (default 8, quick 4)")
    p.add_argument("--sampling-steps", type=int, default=None,
                   help="Euler steps of every rollout and of the judge's samples, 2..100 (default 10)")
    p.add_argument("--eval-per-task", type=int, default=None,
                   help="held-out prompts per task (6 tasks) sampled before and after, 1..64")
    p.add_argument("--eval-seeds", type=int, default=None, help="noise seeds per held-out prompt, 1..16")
    p.add_argument("--out", type=Path, default=Path("runs"), help="runs root folder")
    p.add_argument("--attributes-weight", type=float, default=None,
                   help="with --reward preference: add the attribute recogniser's log-probability with this weight, "
                        "0..20 (0: the preference model alone)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads, 1..64 (default: up to 2)")
    p.add_argument("--lr", type=float, default=None, help="LoRA learning rate")
    p.add_argument("--aesthetic", type=float, default=None, help="weight of the crispness term in the reward")
    p.add_argument("--recogniser", type=Path, default=None,
                   help="reward checkpoint (recogniser.safetensors; default: the committed one)")
    p.add_argument("--smoothing", type=float, default=None,
                   help="randomised smoothing of the reward: pixel-noise sigma in [0, 0.5] (0: off)")
    p.add_argument("--gradient-blur", type=float, default=None,
                   help="low-pass the reward's pixel gradient with a Gaussian of this sigma in pixels, in [0, 4] "
                        "(0: off)")
    p.add_argument("--base", type=Path, default=None,
                   help="base model (a train_base output folder or its transformer.safetensors; default: the "
                        "committed one)")
    p.add_argument("--contrastive", type=int, default=None,
                   help="reward as log P(prompt | image) against this many fixed negative prompts (0: off)")
    a = p.parse_args(argv)
    from flowbp_core.world.reward import CONTRASTIVE_NEGATIVES_MAX, GRADIENT_BLUR_MAX, SMOOTHING_SIGMA_MAX

    if a.contrastive is not None and not 0 <= a.contrastive <= CONTRASTIVE_NEGATIVES_MAX:
        p.error(f"--contrastive={a.contrastive}: allowed range is 0..{CONTRASTIVE_NEGATIVES_MAX}")
    if a.smoothing is not None and not 0.0 <= a.smoothing <= SMOOTHING_SIGMA_MAX:
        p.error(f"--smoothing={a.smoothing}: allowed range is [0, {SMOOTHING_SIGMA_MAX}]")
    if a.gradient_blur is not None and not 0.0 <= a.gradient_blur <= GRADIENT_BLUR_MAX:
        p.error(f"--gradient-blur={a.gradient_blur}: allowed range is [0, {GRADIENT_BLUR_MAX}]")
    if a.recogniser is not None:
        if not a.recogniser.is_file():
            p.error(f"--recogniser={a.recogniser}: no such file (train one with python -m "
                    "services.entrypoints.world.train_reward)")
        a.recogniser = str(a.recogniser.absolute())
    if a.base is not None:
        f = a.base / "transformer.safetensors" if a.base.is_dir() else a.base
        if not f.is_file():
            p.error(f"--base={a.base}: no transformer.safetensors there (train one with python -m "
                    "services.entrypoints.world.train_base)")
        a.base = str(f.absolute())
    if a.threads is not None and not 1 <= a.threads <= 64:
        p.error(f"--threads={a.threads}: allowed range is 1..64")
    torch.set_num_threads(a.threads or max(1, min(2, os.cpu_count() or 1)))
    settings = QUICK if a.quick else FULL
    if a.steps is not None:
        if a.steps < 1:
            p.error(f"--steps={a.steps}: must be >= 1")
        settings = DemoSettings(**{**settings.__dict__, "steps": a.steps})
    if a.batch is not None:
        if not 1 <= a.batch <= 256:
            p.error(f"--batch={a.batch}: allowed range is 1..256")
        settings = DemoSettings(**{**settings.__dict__, "batch": a.batch})
    if a.sampling_steps is not None:
        if not 2 <= a.sampling_steps <= 100:
            p.error(f"--sampling-steps={a.sampling_steps}: allowed range is 2..100")
        settings = DemoSettings(**{**settings.__dict__, "n_steps": a.sampling_steps})
    for flag, name, hi in (("--eval-per-task", "per_task", 64), ("--eval-seeds", "seeds", 16)):
        v = getattr(a, flag[2:].replace("-", "_"))
        if v is not None:
            if not 1 <= v <= hi:
                p.error(f"{flag}={v}: allowed range is 1..{hi}")
            settings = DemoSettings(**{**settings.__dict__, name: v})
    if a.attributes_weight is not None and not 0.0 <= a.attributes_weight <= 20.0:
        p.error(f"--attributes-weight={a.attributes_weight}: allowed range is [0, 20]")
    for name in ("lr", "aesthetic", "recogniser", "smoothing", "gradient_blur", "contrastive", "base", "reward",
                 "attributes_weight"):
        if getattr(a, name) is not None:
            settings = DemoSettings(**{**settings.__dict__, name: getattr(a, name)})
    runtime = a.runtime
    if runtime == "auto":
        runtime = "core" if a.quick or not ray_available() else "ray"
    elif runtime == "ray" and not ray_available():
        print("Ray runtime not available (services.runtime or ray missing): running the core loop", file=sys.stderr)
        runtime = "core"
    run_dir = new_run_dir(a.out.absolute(), f"demo-{time.strftime('%Y%m%d-%H%M%S')}{'-quick' if a.quick else ''}")
    run_id = run_dir.name
    cfg = demo_config(settings, a.out.absolute(), run_id, seed=a.seed, threads=torch.get_num_threads())
    t_start = time.perf_counter()

    from tqdm import tqdm

    from flowbp_core.checkpoint import latest_complete, load_checkpoint
    from flowbp_core.run import build_components
    from flowbp_core.world.data import heldout_prompts
    from flowbp_core.world.evaluate import judge_backbone
    from flowbp_core.world.judge import paired_delta_interval
    from flowbp_core.world.rater import paired_interval, placement_diversity, rate

    print(f"FlowBP demo: embedded model, FlowBP-Sparse, {cfg.reward.terms[0].name} reward, runtime={runtime}, "
          f"{settings.steps} steps x {settings.batch} prompts, {settings.n_steps} sampling steps", flush=True)
    comp = build_components(cfg)  # the committed base model + LoRA (zero-initialised: still the base model)
    items = heldout_prompts(settings.per_task)
    # the held-out list is task-cyclic, so the first rows of the grid show every task
    print(f"sampling the base model on {len(items)} held-out prompts x {settings.seeds} seeds ...", flush=True)
    base = judge_backbone(comp.backbone, items, seeds=settings.seeds, n_steps=settings.n_steps)

    bar = tqdm(total=settings.steps, desc="aligning", unit="step", file=sys.stdout, dynamic_ncols=True)
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
    aligned = judge_backbone(comp.backbone, items, seeds=settings.seeds, n_steps=settings.n_steps)

    tasks = [it.spec.task for it in items] * settings.seeds  # images are seed-major
    rated = {k: rate(ev.images, ev.prompts) for k, ev in (("base", base), ("aligned", aligned))}
    groups = list(range(len(items))) * settings.seeds
    placement = {k: placement_diversity(rated[k].ratings, groups) if settings.seeds > 1 else None
                 for k in ("base", "aligned")}
    reward_curve_png(rows, run_dir / "reward_curve.png", cfg.reward.terms[0].name)
    n_grid = min(len(items), 12)
    before_after_png(base.images[:n_grid], aligned.images[:n_grid], base.prompts[:n_grid],
                     base.report.correct[:n_grid], aligned.report.correct[:n_grid], run_dir / "before_after.png",
                     scores=([r.score for r in rated["base"].ratings[:n_grid]],
                             [r.score for r in rated["aligned"].ratings[:n_grid]]))
    ckpt = latest_complete(run_dir)
    judge_ci = paired_delta_interval(base.report.correct, aligned.report.correct, tasks)
    rater_ci = {part: paired_interval([getattr(r, part) for r in rated["base"].ratings],
                                      [getattr(r, part) for r in rated["aligned"].ratings])
                for part in ("score", "global_part", "local_part")}
    summary = {
        "run_id": run_id, "runtime": runtime, "settings": settings.__dict__,
        "base": {**base.as_dict(), "rater": rated["base"].as_dict(), "placement_diversity": placement["base"]},
        "aligned": {**aligned.as_dict(), "rater": rated["aligned"].as_dict(),
                    "placement_diversity": placement["aligned"]},
        "delta_rater": rated["aligned"].score - rated["base"].score, "delta_rater_95ci": list(rater_ci["score"]),
        "delta_rater_parts_95ci": {"global": list(rater_ci["global_part"]), "local": list(rater_ci["local_part"])},
        "delta_overall": aligned.report.overall - base.report.overall,
        "delta_overall_95ci": list(judge_ci),
        "reward_first": rows[0]["reward"] if rows else None, "reward_last": rows[-1]["reward"] if rows else None,
        "lora": str(ckpt / "lora") if ckpt is not None and (ckpt / "lora").exists() else None,
        "wall_seconds": round(time.perf_counter() - t_start, 1),
    }
    (run_dir / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    print_report(summary, base.report, aligned.report, rated, rows, len(items), settings.seeds)
    print(f"run folder: {run_dir}  ({summary['wall_seconds']:.0f} s)")
    for name in ("metrics.jsonl", "reward_curve.png", "before_after.png", "demo_summary.json"):
        print(f"  {name}")
    if summary["lora"]:
        print(f"  LoRA: {summary['lora']}")
    return 0


def _change(delta: float, ci) -> str:
    note = "  (includes 0: within noise)" if ci[0] <= 0.0 <= ci[1] else ""
    return f"({delta:+.1f}, 95 % interval {ci[0]:+.1f} .. {ci[1]:+.1f}){note}"


def print_report(summary: dict, base_judge, aligned_judge, rated: dict, rows: list[dict], n_prompts: int,
                 seeds: int) -> None:
    from flowbp_core.world.spec import TASKS

    b, a = rated["base"], rated["aligned"]
    print()
    print(f"held-out prompts x seeds: {n_prompts} x {seeds}, the same noise before and after; points of 100")
    print(f"  {'':<22}{'base':>8}{'aligned':>9}")
    print(f"  {'rater (taste)':<22}{b.score:8.1f}{a.score:9.1f}   "
          f"{_change(summary['delta_rater'], summary['delta_rater_95ci'])}")
    for label, part, key in (("  global: size, light", "global_part", "global"),
                             ("  local: crisp edges", "local_part", "local")):
        d = getattr(a, part) - getattr(b, part)
        print(f"  {label:<22}{getattr(b, part):8.1f}{getattr(a, part):9.1f}   "
              f"{_change(d, summary['delta_rater_parts_95ci'][key])}")
    print(f"  {'judge (prompt following)':<22}{base_judge.overall:8.1f}{aligned_judge.overall:9.1f}   "
          f"{_change(summary['delta_overall'], summary['delta_overall_95ci'])}")
    for t in TASKS:
        if t in base_judge.per_task:
            print(f"    {t:<20}{base_judge.per_task[t]:8.1f}{aligned_judge.per_task.get(t, float('nan')):9.1f}")
    if base_judge.diversity is not None:
        print(f"  {'diversity (pixels)':<22}{base_judge.diversity:8.3f}{aligned_judge.diversity:9.3f}")
    pb, pa = summary["base"]["placement_diversity"], summary["aligned"]["placement_diversity"]
    if pb is not None:
        print(f"  {'diversity (placement)':<22}{pb:8.3f}{pa:9.3f}   (what the rater does not score)")
    if not rows:
        return
    k = max(1, len(rows) // 10)
    first, last = (sum(r["reward"] for r in part) / k for part in (rows[:k], rows[-k:]))
    print(f"training reward: {first:.3f} (first {k} steps) -> {last:.3f} (last {k} steps)")
    if summary["settings"]["reward"] != "preference" or last <= first:
        return
    if summary["delta_rater_95ci"][0] <= 0.0:
        print("warning: the preference model's reward rose but the rater's gain is not shown: the policy is gaming "
              "the learned model (compare before_after.png); flowbp_core/world/README.md says what defends against it.")
    elif summary["delta_overall_95ci"][1] < -2.0:
        print("warning: the rater rose but prompt following fell: the taste is bought with broken prompts "
              "(compare before_after.png).")


if __name__ == "__main__":
    raise SystemExit(main())
