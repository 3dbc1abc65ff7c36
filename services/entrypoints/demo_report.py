"""The demo's before/after report: base vs aligned on the same held-out prompts and noise, scored by the analytic
rater (taste, its global and local parts) and judge (prompt following), each change with a paired 95 % interval;
the figures (reward curve, before/after grid) and the printed table with its reward-gaming warnings.
"""

from __future__ import annotations

from pathlib import Path

import torch


def compare(base, aligned, items: list, seeds: int) -> tuple[dict, dict]:
    """Rate and judge the base and aligned samples (`JudgeRun`s of `items` x `seeds`, seed-major): the summary's
    comparison fields, and the rater's report per side ("base", "aligned")."""
    from flowbp_core.world.judge import paired_delta_interval
    from flowbp_core.world.rater import paired_interval, placement_diversity, rate

    tasks = [it.spec.task for it in items] * seeds  # images are seed-major
    rated = {k: rate(ev.images, ev.prompts) for k, ev in (("base", base), ("aligned", aligned))}
    groups = list(range(len(items))) * seeds
    placement = {k: placement_diversity(rated[k].ratings, groups) if seeds > 1 else None
                 for k in ("base", "aligned")}
    judge_ci = paired_delta_interval(base.report.correct, aligned.report.correct, tasks)
    rater_ci = {part: paired_interval([getattr(r, part) for r in rated["base"].ratings],
                                      [getattr(r, part) for r in rated["aligned"].ratings])
                for part in ("score", "global_part", "local_part")}
    fields = {
        "base": {**base.as_dict(), "rater": rated["base"].as_dict(), "placement_diversity": placement["base"]},
        "aligned": {**aligned.as_dict(), "rater": rated["aligned"].as_dict(),
                    "placement_diversity": placement["aligned"]},
        "delta_rater": rated["aligned"].score - rated["base"].score, "delta_rater_95ci": list(rater_ci["score"]),
        "delta_rater_parts_95ci": {"global": list(rater_ci["global_part"]), "local": list(rater_ci["local_part"])},
        "delta_overall": aligned.report.overall - base.report.overall,
        "delta_overall_95ci": list(judge_ci),
    }
    return fields, rated


def write_figures(rows: list[dict], base, aligned, rated: dict, n_prompts: int, run_dir: Path,
                  reward_name: str) -> None:
    """reward_curve.png and before_after.png under `run_dir`; the grid shows the first 12 of the `n_prompts`
    held-out prompts (the list is task-cyclic, so every task), first seed."""
    reward_curve_png(rows, run_dir / "reward_curve.png", reward_name)
    n_grid = min(n_prompts, 12)
    before_after_png(base.images[:n_grid], aligned.images[:n_grid], base.prompts[:n_grid],
                     base.report.correct[:n_grid], aligned.report.correct[:n_grid], run_dir / "before_after.png",
                     scores=([r.score for r in rated["base"].ratings[:n_grid]],
                             [r.score for r in rated["aligned"].ratings[:n_grid]]))


def reward_label(terms) -> str:
    """The reward as a user reads it: "world_preference" or "world_preference + 1.0 x world_attributes"."""
    return " + ".join(t.name if i == 0 and t.weight == 1.0 else f"{t.weight:g} x {t.name}"
                      for i, t in enumerate(terms))


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
    ax.set_ylabel(f"reward: {reward_name} (batch mean)")
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
    if summary["reward"] != "world_preference" or last <= first:
        return
    if summary["delta_rater_95ci"][0] <= 0.0:
        print("warning: the preference model's reward rose but the rater's gain is not shown: the policy is gaming "
              "the learned model (compare before_after.png); flowbp_core/world/README.md says what defends against it.")
    elif summary["delta_overall_95ci"][1] < -2.0:
        print("warning: the rater rose but prompt following fell: the taste is bought with broken prompts "
              "(compare before_after.png).")
