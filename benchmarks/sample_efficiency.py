"""Sample efficiency on the embedded world: every method, the same prompts, sample budget and seeds.

For each method and seed, a fresh LoRA on the committed base model is trained on the task's reward with the
same prompts (world_train), batch, learning rate, sampling steps and seeds; every `--eval-every` steps a fixed
held-out prompt set is sampled with fixed noise and scored by analytic scorers that are not the reward.
Tasks (`--task`):
- `preference` (default): reward `world_preference` (the learned preference model), scored by the rater (taste,
  with its global part, decided early in sampling, and its local part, decided late) and the judge;
- `attributes`: reward `world_attributes` (the recogniser), scored by the judge (prompt following).
Recorded: training reward vs samples seen (samples = rollout trajectories; DRaFT-LV's extra re-noised endpoints
are not counted as new samples), held-out scores vs samples seen, wall time per step, and the bytes autograd
saves for backward in one learner step (endpoint + decode + reward; parameters excluded).

    .venv/bin/python benchmarks/sample_efficiency.py [--quick] [--task preference] [--methods a,b] [--seeds 3]
        [--steps 24] [--out benchmarks/results/sample_efficiency]

Writes <out>.json, <out>.png and <out>.md (the table), and prints the table (mean +- std over seeds).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flowbp_core.config import (BackboneSpec, CheckpointSpec, LoRASpec, MethodSpec, PromptSource,  # noqa: E402
                                RewardSpec, RunConfig, SamplingSpec, TrainSpec)
from flowbp_core.methods.memory import saved_tensor_bytes  # noqa: E402

METHODS = ("flowbp_sparse", "flowbp_bridge", "flowbp_lagrange", "refl", "draft_lv", "drtune", "leapalign",
           "draft_k", "alignprop")
FLOWBP = ("flowbp_sparse", "flowbp_bridge", "flowbp_lagrange")


@dataclass
class Settings:
    steps: int = 16
    batch: int = 4
    n_steps: int = 10
    seeds: int = 3
    lr: float = 1e-3
    rank: int = 8
    eval_every: int = 4
    eval_per_task: int = 3
    eval_seeds: int = 1
    task: str = "preference"


TASKS = {  # task -> (reward, loss, clip, the held-out score that ranks the methods)
    "preference": ("world_preference", "neg_mean", 0.0, "rater"),
    "attributes": ("world_attributes", "hinge", -0.05, "judge"),
}


QUICK = Settings(steps=2, batch=2, n_steps=6, seeds=1, eval_every=2, eval_per_task=1, eval_seeds=1, rank=4)


@dataclass
class RunRecord:
    method: str
    seed: int
    samples: list[int] = field(default_factory=list)  # after each step
    reward: list[float] = field(default_factory=list)  # batch mean per step
    eval_samples: list[int] = field(default_factory=list)
    judge: list[float] = field(default_factory=list)  # held-out overall, points of 100
    rater: list[float] = field(default_factory=list)  # held-out rating (preference task), points of 100
    rater_global: list[float] = field(default_factory=list)
    rater_local: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    saved_bytes: int = 0
    skipped: int = 0


def run_config(method: str, s: Settings, seed: int) -> RunConfig:
    return RunConfig(
        run_id=f"bench-{method}-{seed}",
        backbone=BackboneSpec(name="embedded", device="cpu", finetune="lora", lora=LoRASpec(rank=s.rank)),
        method=MethodSpec(name=method, preset="sd35"),
        reward=RewardSpec(loss=TASKS[s.task][1], clip=TASKS[s.task][2]),
        sampling=SamplingSpec(n_steps=s.n_steps),
        train=TrainSpec(steps=s.steps, batch_size=s.batch, lr=s.lr, seed=seed, prompts=PromptSource(set="world_train")),
        checkpoint=CheckpointSpec(dir="/tmp/flowbp-bench-unused", every=10**6),
    )


def measure_saved_bytes(comp, cache) -> int:
    """Bytes saved for backward by one learner step's graph (endpoint -> decode -> reward), then discarded."""
    velocity = comp.backbone.bind(cache.cond, comp.guidance)
    params = comp.backbone.trainable_parameters()
    score = comp.score_fn()

    def forward():
        ep = comp.method.endpoint(cache, velocity)
        prompts = [cache.prompts[int(i)] for i in ep.sample_index.tolist()]
        return score(ep.value, prompts)

    nbytes, out = saved_tensor_bytes(forward, exclude=params)
    del out
    return int(nbytes)


def run_one(method: str, seed: int, s: Settings, reward, items, progress) -> RunRecord:
    from flowbp_core.run import build_components, make_optimizer, rollout_for
    from flowbp_core.step import learn_step

    cfg = run_config(method, s, seed)
    comp = build_components(cfg, with_reward=False)
    comp.reward = reward
    opt = make_optimizer(cfg, comp.backbone.trainable_parameters())
    rec = RunRecord(method=method, seed=seed)
    version, samples = 0, 0
    for step in range(s.steps):
        t0 = time.perf_counter()
        cache = rollout_for(comp, step, version)
        t_roll = time.perf_counter() - t0
        if step == 0:  # the probe builds (and drops) one extra graph; it is not part of the step time
            rec.saved_bytes = measure_saved_bytes(comp, cache)
        t1 = time.perf_counter()
        res = learn_step(cache, comp, step=step, optimizer=opt)
        dt = t_roll + (time.perf_counter() - t1)
        if not res.skipped:
            version += 1
        else:
            rec.skipped += 1
        samples += s.batch
        rec.samples.append(samples)
        rec.reward.append(float(res.reward_mean))
        rec.step_seconds.append(dt)
        if (step + 1) % s.eval_every == 0 or step + 1 == s.steps:
            ev = held_out(comp.backbone, items, s)
            rec.eval_samples.append(samples)
            for name, v in ev.items():
                getattr(rec, name).append(v)
        progress(method, seed, step + 1, res.reward_mean)
    return rec


def held_out(backbone, items, s: Settings) -> dict[str, float]:
    """The held-out scores of the backbone as it is now: judge, and for the preference task the rater's."""
    from flowbp_core.world.evaluate import judge_backbone
    from flowbp_core.world.rater import rate

    ev = judge_backbone(backbone, items, seeds=s.eval_seeds, n_steps=s.n_steps)
    out = {"judge": ev.report.overall}
    if s.task == "preference":
        r = rate(ev.images, ev.prompts)
        out.update(rater=r.score, rater_global=r.global_part, rater_local=r.local_part)
    return out


def score_of(rec: RunRecord, s: Settings) -> list[float]:
    """The held-out score that ranks the methods on this task, one per evaluation."""
    return getattr(rec, TASKS[s.task][3])


def _ms(vals: list[float]) -> tuple[float, float]:
    vals = [v for v in vals if v is not None and not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def samples_to_reach(scores: list[float], eval_samples: list[int], target: float, base: float) -> int | None:
    if base >= target:
        return 0
    for n, j in zip(eval_samples, scores):
        if j >= target:
            return n
    return None


def summarise(records: list[RunRecord], base: dict[str, float], s: Settings) -> tuple[list[dict], dict]:
    """Per-method rows (means and spreads over seeds) and the verdict: best baseline, samples each FlowBP variant
    needs to reach its final score, and whether best and worst methods are apart beyond their seed spreads."""
    by: dict[str, list[RunRecord]] = {}
    for r in records:
        by.setdefault(r.method, []).append(r)
    metric = TASKS[s.task][3]
    rows = []
    tail = max(1, s.steps // 4)
    for m, recs in by.items():
        row = {"method": m, "seeds": len(recs)}
        for key, vals in (("final_reward", [statistics.fmean(r.reward[-tail:]) for r in recs]),
                          ("final_score", [score_of(r, s)[-1] for r in recs]),
                          ("final_judge", [r.judge[-1] for r in recs]),
                          ("final_global", [r.rater_global[-1] for r in recs if r.rater_global]),
                          ("final_local", [r.rater_local[-1] for r in recs if r.rater_local]),
                          ("step_s", [statistics.median(r.step_seconds) for r in recs])):
            row[f"{key}_mean"], row[f"{key}_std"] = _ms(vals)
        row.update(saved_mb=statistics.fmean(r.saved_bytes for r in recs) / 2**20, skipped=sum(r.skipped for r in recs))
        rows.append(row)
    base_score = base[metric]
    verdict: dict = {"metric": metric, "base": base, "base_score": base_score}
    if len(rows) >= 2:
        hi = max(rows, key=lambda r: r["final_score_mean"])
        lo = min(rows, key=lambda r: r["final_score_mean"])
        gap = hi["final_score_mean"] - lo["final_score_mean"]
        verdict.update(best=hi["method"], worst=lo["method"], best_minus_worst=gap,
                       ranking_resolved=gap > hi["final_score_std"] + lo["final_score_std"])
    baselines = [r for r in rows if r["method"] not in FLOWBP]
    if baselines:
        best = max(baselines, key=lambda r: r["final_score_mean"])
        budget = s.steps * s.batch
        verdict.update(best_baseline=best["method"], best_baseline_final=best["final_score_mean"], budget=budget)
        for r in rows:
            reach = [samples_to_reach(score_of(rec, s), rec.eval_samples, best["final_score_mean"], base_score)
                     for rec in by[r["method"]]]
            ok = [x for x in reach if x is not None]
            r["samples_to_best_baseline"] = statistics.fmean(ok) if len(ok) == len(reach) else None
            r["reached_in_seeds"] = f"{len(ok)}/{len(reach)}"
        if best["final_score_mean"] <= base_score:
            verdict["note"] = (f"the best baseline ({best['method']}) ends at or below the base model's held-out "
                               f"{metric} ({base_score:.1f}): 'samples to reach it' is 0 for everyone and says nothing")
        for r in rows:
            if r["method"] in FLOWBP:
                n = r["samples_to_best_baseline"]
                if "note" in verdict:
                    verdict[r["method"]] = "not measurable: the best baseline did not improve on the base model"
                    continue
                verdict[r["method"]] = ("meets target (<= half the budget)" if n is not None and n <= budget / 2 else
                                        f"misses: reaches it with {n:.0f} of {budget} samples" if n is not None else
                                        f"misses: does not reach {best['final_score_mean']:.1f} "
                                        f"within {budget} samples")
    return rows, verdict


def table_md(rows: list[dict], verdict: dict, s: Settings, machine: str) -> str:
    metric = verdict["metric"]
    base = verdict["base"]
    base_s = ", ".join(f"{k} {v:.1f}" for k, v in base.items())
    out = [f"Sample efficiency on the embedded world, task `{s.task}` ({machine}); {s.seeds} seeds x {s.steps} steps x "
           f"{s.batch} prompts = {s.steps * s.batch} samples per run, {s.n_steps} sampling steps, LoRA rank {s.rank}, "
           f"lr {s.lr}; held-out set {s.eval_per_task * 6} prompts x {s.eval_seeds} seeds. Base model: {base_s}.", "",
           f"| method | final train reward | final held-out {metric} | global | local | judge | samples to best "
           "baseline | s/step | saved for backward (MB) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def pm(r, k, fmt=".1f"):
        m, sd = r[f"{k}_mean"], r[f"{k}_std"]
        return "-" if math.isnan(m) else f"{m:{fmt}} +- {sd:{fmt}}"

    for r in sorted(rows, key=lambda r: -r["final_score_mean"]):
        reach = r.get("samples_to_best_baseline")
        reach_s = "-" if "reached_in_seeds" not in r else (f"{reach:.0f} ({r['reached_in_seeds']})" if reach is not None
                                                              else f"not reached ({r['reached_in_seeds']})")
        out.append(f"| {r['method']} | {pm(r, 'final_reward', '.3f')} | {pm(r, 'final_score')} | "
                   f"{pm(r, 'final_global')} | {pm(r, 'final_local')} | {pm(r, 'final_judge')} | {reach_s} | "
                   f"{pm(r, 'step_s', '.2f')} | {r['saved_mb']:.1f} |")
    if "best" in verdict:
        out += ["", f"Best {verdict['best']}, worst {verdict['worst']}: "
                    f"{verdict['best_minus_worst']:.1f} points apart, "
                    + ("more than" if verdict["ranking_resolved"] else "within")
                    + " the sum of their seed spreads (ranking " + ("resolved" if verdict["ranking_resolved"] else
                                                                    "not resolved") + ")."]
    if "best_baseline" in verdict:
        out += ["", f"Best baseline: {verdict['best_baseline']} ({verdict['best_baseline_final']:.1f}). "
                    "Target: a FlowBP variant reaches it with at most half the budget."]
        out += [f"- {m}: {verdict[m]}" for m in FLOWBP if m in verdict]
        if "note" in verdict:
            out += [f"- note: {verdict['note']}"]
    return "\n".join(out) + "\n"


def plot(records: list[RunRecord], base: dict[str, float], s: Settings, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by: dict[str, list[RunRecord]] = {}
    for r in records:
        by.setdefault(r.method, []).append(r)
    panels = [("reward", "training reward (batch mean)", TASKS[s.task][0] + " reward")]
    panels += ([("rater", "held-out rater (points)", "rater (not the reward)"),
                ("rater_global", "global part (points)", "global: size, light (early)"),
                ("rater_local", "local part (points)", "local: crisp edges (late)")] if s.task == "preference" else [])
    panels += [("judge", "held-out judge (points)", "judge: prompt following")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), dpi=100)
    cmap = plt.get_cmap("tab10")
    for i, (m, recs) in enumerate(sorted(by.items())):
        style = "-" if m in FLOWBP else "--"
        for ax, (key, _, _) in zip(axes, panels):
            if key == "reward":
                x, ys = recs[0].samples, torch.tensor([r.reward for r in recs])
            else:
                x = [0] + recs[0].eval_samples
                ys = torch.tensor([[base[key]] + getattr(r, key) for r in recs])
            mean, std = ys.mean(0), (ys.std(0) if len(recs) > 1 else torch.zeros(ys.shape[1]))
            ax.plot(x, mean, style, marker=None if key == "reward" else "o", ms=3, color=cmap(i), label=m)
            ax.fill_between(x, mean - std, mean + std, color=cmap(i), alpha=0.12)
    for ax, (_, ylabel, title) in zip(axes, panels):
        ax.set(xlabel="samples seen", ylabel=ylabel, title=title)
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def merge(paths: list[Path], out: Path) -> int:
    """Combine per-seed result files (same settings, same base judge) into one table and plot."""
    parts = [json.loads(p.read_text()) for p in paths]
    first = parts[0]
    for p, d in zip(paths, parts):
        if ({k: v for k, v in d["settings"].items() if k != "seeds"}
                != {k: v for k, v in first["settings"].items() if k != "seeds"}):
            raise SystemExit(f"--merge: {p} was run with other settings than {paths[0]}")
    s = Settings(**first["settings"])
    records = [RunRecord(**r) for d in parts for r in d["runs"]]
    s.seeds = len({r.seed for r in records})
    rows, verdict = summarise(records, first["base"], s)
    md = table_md(rows, verdict, s, first["machine"])
    result = {"settings": asdict(s), "machine": first["machine"], "base": first["base"], "rows": rows,
              "verdict": verdict, "runs": [asdict(r) for r in records],
              "wall_seconds": max(d["wall_seconds"] for d in parts), "merged_from": [str(p) for p in paths]}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(md)
    plot(records, first["base"], s, out.with_suffix(".png"))
    print(md)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CI-sized: 2 steps, 1 seed, tiny eval")
    p.add_argument("--task", choices=tuple(TASKS), default="preference",
                   help="preference: world_preference reward, rater score (default); "
                        "attributes: world_attributes, judge")
    p.add_argument("--lr", type=float, default=None, help="LoRA learning rate")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--n-steps", type=int, default=None, help="sampling steps N")
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--eval-per-task", type=int, default=None, help="held-out prompts per task for the judge")
    p.add_argument("--eval-seeds", type=int, default=None, help="noise seeds per held-out prompt")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "sample_efficiency")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed-list", default=None,
                   help="run only these seeds (comma list), e.g. one process per seed; combine with --merge")
    p.add_argument("--merge", default=None,
                   help="comma list of JSON files written by --seed-list runs: combine them into one table/plot")
    a = p.parse_args(argv)
    if a.merge:
        return merge([Path(x) for x in a.merge.split(",") if x], a.out)
    if a.threads:
        torch.set_num_threads(a.threads)
    s = Settings(**asdict(QUICK)) if a.quick else Settings()
    for name in ("seeds", "steps", "batch", "n_steps", "eval_every", "eval_per_task", "eval_seeds"):
        v = getattr(a, name)
        if v is not None:
            if v < 1:
                p.error(f"--{name.replace('_', '-')}={v}: must be >= 1")
            setattr(s, name, v)
    s.task = a.task
    if a.lr is not None:
        if not 0.0 < a.lr <= 1.0:
            p.error(f"--lr={a.lr}: allowed range is (0, 1]")
        s.lr = a.lr
    from flowbp_core import methods as methods_mod
    from flowbp_core.rewards import build as build_reward
    from flowbp_core.world.data import heldout_prompts

    chosen = [m.strip() for m in a.methods.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in methods_mod.names()]
    if unknown:
        p.error(f"--methods: unknown {unknown}; known: {methods_mod.names()}")
    reward = build_reward(TASKS[s.task][0])
    items = heldout_prompts(s.eval_per_task)
    # the base model's held-out scores (the same for every method: same weights, prompts and noise)
    from flowbp_core.backbones.embedded import EmbeddedBackbone

    base = held_out(EmbeddedBackbone.default(), items, s)
    t_all = time.perf_counter()

    def progress(m, seed, step, r):
        print(f"\r{m:<16} seed {seed} step {step}/{s.steps} reward {r:+.3f}  ({time.perf_counter() - t_all:.0f} s)",
              end="", file=sys.stderr, flush=True)

    seeds = [int(x) for x in a.seed_list.split(",")] if a.seed_list else list(range(s.seeds))
    s.seeds = len(seeds)
    records = []
    for seed in seeds:
        for m in chosen:
            records.append(run_one(m, seed, s, reward, items, progress))
    print(file=sys.stderr)
    rows, verdict = summarise(records, base, s)
    machine = f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    md = table_md(rows, verdict, s, machine)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"settings": asdict(s), "machine": machine, "base": base, "rows": rows, "verdict": verdict,
              "runs": [asdict(r) for r in records], "wall_seconds": time.perf_counter() - t_all}
    a.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    a.out.with_suffix(".md").write_text(md)
    plot(records, base, s, a.out.with_suffix(".png"))
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
