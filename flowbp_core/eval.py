"""Evaluation: generate images for a prompt set without gradients, score them with several rewards, and write a
table (markdown + JSON) and an image grid. The command is `python -m services.entrypoints.eval` (its --help).

Each prompt i gets its own noise seed (seed + i), so a score does not depend on the batch size or on --limit, and
two checkpoints evaluated with the same seed see the same noise. `load_backbone` takes a FlowBP checkpoint (a
`runs/<id>/step_<n>` folder or the run folder, whose latest complete step is used) holding LoRA or full
fine-tuned weights; the backbone is then built as the checkpoint's config says.

The scoring half (`evaluate_images`, `score_batch`, `summarize`, `write_report`) takes any images and is usable
on its own.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from flowbp_core.errors import ConfigError

FORMAT_VERSION = 1


# ------------------------------------------------------------------------------------------------- scoring
@dataclass
class SampleScore:
    index: int
    prompt: str
    seed: int
    scores: dict[str, float]
    image: str | None = None  # relative path of the saved PNG


@dataclass
class RewardSummary:
    mean: float
    std: float
    min: float
    max: float
    n: int


@dataclass
class EvalReport:
    format_version: int
    backbone: str | None
    pretrained: str | None
    checkpoint: str | None
    prompts: str
    n_prompts: int
    steps: int | None
    seed: int
    guidance: float | None
    rewards: list[str]
    summary: dict[str, RewardSummary]
    samples: list[SampleScore]
    seconds: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def score_batch(images: Tensor, prompts: Sequence[str], rewards: dict[str, Callable]) -> dict[str, Tensor]:
    """Score one batch (images [B,3,H,W] in [0,1]) with every reward, without gradients.

    A non-finite score is an error, not a number to average: it names the reward and the prompt."""
    out: dict[str, Tensor] = {}
    with torch.no_grad():
        for name, reward in rewards.items():
            r = reward(images, list(prompts)).detach().float().cpu()
            if r.shape != (len(prompts),):
                raise ValueError(f"reward {name!r} returned shape {tuple(r.shape)} for {len(prompts)} images")
            bad = (~torch.isfinite(r)).nonzero().flatten().tolist()
            if bad:
                raise ValueError(f"reward {name!r} gave a non-finite score for prompt {prompts[bad[0]]!r}")
            out[name] = r
    return out


def summarize(samples: Sequence[SampleScore], names: Sequence[str]) -> dict[str, RewardSummary]:
    out = {}
    for n in names:
        v = np.array([s.scores[n] for s in samples], dtype=np.float64)
        out[n] = RewardSummary(mean=float(v.mean()), std=float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                               min=float(v.min()), max=float(v.max()), n=int(len(v)))
    return out


def to_uint8(images: Tensor) -> np.ndarray:
    """[B,3,H,W] in [0,1] -> [B,H,W,3] uint8 (clamped: this is for saving, never for gradients)."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def make_grid(images: Sequence[np.ndarray], columns: int = 8, pad: int = 2) -> np.ndarray:
    """Tile HxWx3 uint8 images (all the same size) into one image, white gutters."""
    if not images:
        raise ValueError("make_grid: no images")
    h, w, _ = images[0].shape
    cols = min(columns, len(images))
    rows = math.ceil(len(images) / cols)
    grid = np.full((rows * h + (rows + 1) * pad, cols * w + (cols + 1) * pad, 3), 255, dtype=np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        grid[y:y + h, x:x + w] = im
    return grid


def markdown_table(report: EvalReport, max_rows: int = 50) -> str:
    names = report.rewards
    lines = [f"# Evaluation: {report.backbone or 'images'} on {report.prompts} ({report.n_prompts} prompts)", ""]
    meta = {"pretrained": report.pretrained, "checkpoint": report.checkpoint, "steps": report.steps,
            "seed": report.seed, "guidance": report.guidance}
    lines += [f"- {k}: `{v}`" for k, v in meta.items() if v is not None]
    lines += ["", "| reward | mean | std | min | max | n |", "|---|---:|---:|---:|---:|---:|"]
    for n in names:
        s = report.summary[n]
        lines.append(f"| {n} | {s.mean:.4f} | {s.std:.4f} | {s.min:.4f} | {s.max:.4f} | {s.n} |")
    if max_rows > 0:
        lines += ["", f"## Per prompt (first {min(max_rows, len(report.samples))} of {len(report.samples)})", "",
                  "| # | prompt | " + " | ".join(names) + " |", "|---:|---|" + "---:|" * len(names)]
    for s in report.samples[:max_rows]:
        p = s.prompt.replace("|", "\\|")
        p = p if len(p) <= 80 else p[:77] + "..."
        lines.append(f"| {s.index} | {p} | " + " | ".join(f"{s.scores[n]:.4f}" for n in names) + " |")
    if report.seconds:
        lines += ["", "Time (s): " + ", ".join(f"{k} {v:.1f}" for k, v in report.seconds.items())]
    return "\n".join(lines) + "\n"


def write_report(out: Path, report: EvalReport, grid_images: Sequence[np.ndarray], columns: int = 8) -> None:
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    (out / "scores.json").write_text(report.to_json())
    (out / "scores.md").write_text(markdown_table(report))
    if grid_images:
        Image.fromarray(make_grid(grid_images, columns)).save(out / "grid.png")


def evaluate_images(batches: Iterable[tuple[Tensor, list[str], list[int]]], rewards: dict[str, Callable], out: Path,
                    *, prompts_name: str, total: int, seed: int = 0, save_images: bool = True,
                    grid_size: int = 16, meta: dict[str, Any] | None = None, progress: bool = True) -> EvalReport:
    """Score batches of (images, prompts, indices), save PNGs and the report. Returns the report."""
    from PIL import Image
    from tqdm import tqdm

    if not rewards:
        raise ConfigError("eval.rewards", [], "at least one reward name")
    out.mkdir(parents=True, exist_ok=True)
    if save_images:
        (out / "images").mkdir(exist_ok=True)
    samples: list[SampleScore] = []
    grid: list[np.ndarray] = []
    t_gen = t_score = 0.0
    bar = tqdm(total=total, desc="eval", unit="img", disable=not progress, file=sys.stderr)
    it = iter(batches)
    while True:
        t0 = time.perf_counter()
        try:
            images, prompts, idx = next(it)
        except StopIteration:
            break
        t1 = time.perf_counter()
        scores = score_batch(images, prompts, rewards)
        t_gen, t_score = t_gen + (t1 - t0), t_score + (time.perf_counter() - t1)
        pix = to_uint8(images)
        for j, (p, i) in enumerate(zip(prompts, idx)):
            rel = None
            if save_images:
                rel = f"images/{i:05d}.png"
                Image.fromarray(pix[j]).save(out / rel)
            if len(grid) < grid_size:
                grid.append(pix[j])
            samples.append(SampleScore(index=i, prompt=p, seed=seed + i,
                                       scores={n: float(v[j]) for n, v in scores.items()}, image=rel))
        bar.update(len(prompts))
        bar.set_postfix({n: f"{np.mean([s.scores[n] for s in samples]):.3f}" for n in rewards})
    bar.close()
    if not samples:
        raise ConfigError("eval.prompts", prompts_name, "at least one prompt to evaluate")
    meta = meta or {}
    report = EvalReport(format_version=FORMAT_VERSION, backbone=meta.get("backbone"),
                        pretrained=meta.get("pretrained"), checkpoint=meta.get("checkpoint"), prompts=prompts_name,
                        n_prompts=len(samples), steps=meta.get("steps"), seed=seed, guidance=meta.get("guidance"),
                        rewards=list(rewards), summary=summarize(samples, list(rewards)), samples=samples,
                        seconds={**meta.get("seconds", {}), "generate": t_gen, "score": t_score})
    write_report(out, report, grid)
    return report


# ----------------------------------------------------------------------------------------------- generation
def ema_by_name(names: list[str], ema: dict[str, Tensor]) -> dict[str, Tensor]:
    """A checkpoint's EMA shadow (`ema.<i>`, in trainable-parameter order) keyed by the trainable weights' names."""
    if len(names) != len(ema):
        raise ValueError(f"the checkpoint's EMA holds {len(ema)} tensors, this backbone trains {len(names)}")
    return {n: ema[f"ema.{i}"] for i, n in enumerate(names)}


def load_backbone(name: str, pretrained: str | None, checkpoint: str | None, *, tiny: bool = False, seed: int = 0,
                  dtype: str = "float32", device: str = "cpu", local_files_only: bool = True,
                  ema: bool | None = None):
    """The backbone to evaluate, with a FlowBP checkpoint's LoRA or full weights loaded when one is given:
    its EMA weights when it has them and `ema` is None (the paper evaluates the EMA), always with `ema=True`
    (an error without them), never with `ema=False`."""
    from flowbp_core import backbones
    from flowbp_core.backbones.base import LoRAConfig
    from flowbp_core.checkpoint import latest_complete, load_checkpoint

    from flowbp_core.dtypes import resolve_dtype

    kw = backbones.build_kwargs(tiny=tiny, path=pretrained, local_files_only=local_files_only,
                                dtype=resolve_dtype(dtype, "eval.dtype"), device=device, seed=seed if tiny else None)
    bb = backbones.build(name, pretrained, tiny=tiny, **kw)
    if checkpoint is None:
        return bb
    ck = Path(checkpoint)
    if ck.is_dir() and not (ck / "COMPLETE").exists():
        latest = latest_complete(ck)
        if latest is None:
            raise FileNotFoundError(f"--lora {checkpoint}: expected a checkpoint folder runs/<id>/step_<n> (with a "
                                    "COMPLETE marker) or a run folder holding one; found neither")
        ck = latest
    elif not ck.exists():
        raise FileNotFoundError(f"--lora {checkpoint}: no such checkpoint folder (expected runs/<id>/step_<n>)")
    state = load_checkpoint(ck)
    spec = ((state.config or {}).get("backbone") or {})
    if spec.get("finetune", "lora") == "lora":
        lo = spec.get("lora") or {}
        bb.apply_lora(LoRAConfig(rank=int(lo.get("rank", 16)), alpha=lo.get("alpha"),
                                 dropout=float(lo.get("dropout", 0.0)),
                                 target_modules=tuple(lo["target_modules"]) if lo.get("target_modules") else None))
    elif hasattr(bb, "enable_full_finetune"):
        bb.enable_full_finetune()
    weights = state.trainable
    if ema is None:
        ema = state.ema is not None
    if ema:
        if state.ema is None:
            raise FileNotFoundError(f"--ema: the checkpoint {ck} has no ema.safetensors (EMA was off in that run)")
        weights = ema_by_name(list(bb.trainable_state_dict()), state.ema)
    with torch.no_grad():
        bb.load_trainable_state_dict(weights)
    for p in bb.trainable_parameters():
        p.requires_grad_(False)
    return bb


def sample_batches(backbone, prompts: Sequence[str], noise: Callable[[int, int], Tensor], *, sigmas: Tensor,
                   guidance, batch_size: int, seed: int = 0,
                   progress: bool = False) -> Iterator[tuple[Tensor, list[str], list[int]]]:
    """The one sampler without gradients (evaluation, the world's judge and sample pool): yield (images in [0,1]
    [b, 3, H, W], prompts, indices) batch by batch; `noise(start, end)` gives the noise of prompts [start, end);
    each batch is rolled out keeping nothing and decoded."""
    from tqdm import tqdm

    from flowbp_core.cache import CacheNeeds
    from flowbp_core.sampling import rollout

    nothing = CacheNeeds(states=frozenset(), velocities=frozenset())
    for start in tqdm(range(0, len(prompts), batch_size), desc="sampling", unit="batch", disable=not progress):
        batch = list(prompts[start:start + batch_size])
        idx = list(range(start, start + len(batch)))
        with torch.no_grad():
            cond = backbone.encode_prompts(batch)
            cache = rollout(backbone.bind(cond, guidance), noise(start, start + len(batch)).to(backbone.device),
                            sigmas, seed=seed, cond=cond, prompts=batch, needs=nothing)
            images = backbone.decode(cache.final.to(backbone.device))
        yield images.float(), batch, idx


def generate(backbone, prompts: Sequence[str], *, batch_size: int, steps: int | None, seed: int,
             guidance_scale: float | None = None) -> Iterator[tuple[Tensor, list[str], list[int]]]:
    """`sample_batches` as evaluation samples: the pipeline's schedule (`eval_schedule`), the preset's guidance at
    `guidance_scale`, and the noise of prompt i from seed + i (the same whatever the batch size or --limit)."""
    from flowbp_core.backbones.base import eval_schedule
    from flowbp_core.guidance import GuidanceConfig

    g = backbone.preset.guidance
    if guidance_scale is not None:
        g = GuidanceConfig(mode=g.mode, scale=guidance_scale, detach_negative=g.detach_negative)
    shape = backbone.latent_shape(1)[1:]

    def noise(start: int, end: int) -> Tensor:
        return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + i))
                            for i in range(start, end)])

    return sample_batches(backbone, prompts, noise, sigmas=eval_schedule(backbone, steps or backbone.preset.n_steps)
                          .sigmas, guidance=g, batch_size=batch_size, seed=seed)


# ------------------------------------------------------------------------------------------------- rewards
def parse_reward_args(items: Sequence[str], names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """`["hpsv2.checkpoint=/x.pt", "clipscore.scale=2.5"]` -> {"hpsv2": {"checkpoint": "/x.pt"}, ...}."""
    out: dict[str, dict[str, Any]] = {n: {} for n in names}
    for item in items:
        key, eq, value = item.partition("=")
        name, dot, arg = key.partition(".")
        if not eq or not dot or not arg:
            raise ConfigError("--reward-arg", item, "NAME.KEY=VALUE, e.g. hpsv2.checkpoint=/models/hps.pt")
        if name not in out:
            raise ConfigError("--reward-arg", item, f"a NAME among the --rewards given: {', '.join(names)}")
        try:
            out[name][arg] = json.loads(value)
        except json.JSONDecodeError:
            out[name][arg] = value
    return out


def build_rewards(names: Sequence[str], kwargs: dict[str, dict[str, Any]], device: str = "cpu") -> dict[str, Any]:
    from flowbp_core import rewards as R

    built = {}
    for n in names:
        r = R.build(n, **kwargs.get(n, {}))
        built[n] = r.to(device) if hasattr(r, "to") else r
    return built
