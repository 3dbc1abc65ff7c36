"""Train the attribute recogniser behind the "world_attributes" reward on rendered scenes (`train_reward(options)`;
the command is `python -m services.entrypoints.world.train_reward`, see README.md in this folder).

Scenes: 1-3 random objects (and 5 % empty backgrounds, and scenes drawn from prompt specs so that three
objects of one kind are common), with random Gaussian blur, pixel noise and brightness jitter so that the
recogniser also reads a generator's soft samples. Reports per-head accuracy on a fixed validation set.

`generated` (files of `sample_pool`) mixes the generator's own images into every batch (`generated_frac` of
it), labelled by what the detector finds in them (`recogniser.detected_labels`): the
generator's artefacts then carry their true content instead of whatever the render-trained recogniser reads
into them, which is what alignment otherwise exploits. 10 % of each pool is held out for validation.

`adversarial_eps` trains half of each batch on its worst case within an L2 ball of that radius (projected
gradient ascent, `adversarial_steps`), and logs the validation accuracy under that attack (`advval_*`).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from flowbp_core.errors import check_range
from flowbp_core.world.assets import save_checkpoint
from flowbp_core.world.data import prompt_pool
from flowbp_core.world.recogniser import Recogniser, RecogniserConfig, recogniser_loss, scene_labels
from flowbp_core.world.scenes import Scene, render_batch, sample_free_scene, sample_scene


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-sample separable Gaussian blur (sigma 0 = identity)."""
    r = torch.arange(-2, 3, dtype=torch.float32)
    k = torch.exp(-0.5 * (r[None, :] / sigma.clamp_min(1e-3)[:, None]) ** 2)
    k = k / k.sum(1, keepdim=True)  # [B, 5]
    b, c, h, w = x.shape
    xp = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="replicate")
    out = sum(k[:, i].view(b, 1, 1, 1) * xp[:, :, :, i : i + w] for i in range(5))
    out = sum(k[:, i].view(b, 1, 1, 1) * out[:, :, i : i + h, :] for i in range(5))
    return out


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    b = x.shape[0]
    sigma = torch.rand(b, generator=g) * 1.0 * (torch.rand(b, generator=g) < 0.7)
    x = _blur(x, sigma)
    x = x * (0.85 + 0.3 * torch.rand(b, 1, 1, 1, generator=g))
    x = x + torch.randn(x.shape, generator=g) * (0.08 * torch.rand(b, 1, 1, 1, generator=g))
    return x.clamp(0.0, 1.0)


def adversarial(
    model: Recogniser, x: torch.Tensor, lab: dict[str, torch.Tensor], eps: float, steps: int
) -> torch.Tensor:
    """L2 projected gradient ascent on the recogniser's loss: the worst image within `eps` (L2, pixel units in
    [0, 1]) of each x, kept in [0, 1].

    Why: alignment is gradient ascent on the reward through the generator, and a plain CNN's input gradient is
    dominated by small high-frequency patterns (a faint grid raises a shape's probability). Training on these
    worst cases (adversarial training) leaves a recogniser whose gradient points at changes of the objects
    themselves ("perceptually aligned gradients", Santurkar et al. 2019), which is what alignment needs.
    """
    was_training = model.training
    model.eval()  # attack the model as it is used (no training-mode layer behaviour while searching)
    alpha = 2.5 * eps / steps
    delta = torch.zeros_like(x)
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = recogniser_loss(model(x + delta), lab)
        (g,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            g_norm = g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
            delta = delta + alpha * g / g_norm
            d_norm = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
            delta = delta * (eps / d_norm).clamp(max=1.0)
            delta = (x + delta).clamp(0.0, 1.0) - x
    model.train(was_training)
    return (x + delta).detach()


def make_batch(n: int, rng: np.random.Generator, pool) -> list[Scene]:
    scenes: list[Scene] = []
    for _ in range(n):
        u = rng.random()
        if u < 0.05:
            scenes.append(Scene(objects=(), background=("black", "gray", "white")[int(rng.integers(3))]))
        elif u < 0.45:
            scenes.append(sample_scene(pool[int(rng.integers(len(pool)))].spec, rng))
        else:
            scenes.append(sample_free_scene(rng))
    return scenes


@torch.no_grad()
def accuracy(model: Recogniser, x: torch.Tensor, lab: dict[str, torch.Tensor]) -> dict[str, float]:
    out = model(x)
    acc = {k: float((out[k].argmax(-1) == lab[k]).float().mean())
           for k in ("pair_count", "shape_count", "colour_count")}
    present = lab["pair_count"] > 0
    pos_ok = ((out["pair_pos"] > 0).float() == lab["pair_pos"]).all(-1)
    acc["pair_pos"] = float(pos_ok[present].float().mean())
    acc["scene_exact"] = float((out["pair_count"].argmax(-1) == lab["pair_count"]).flatten(1).all(1).float().mean())
    return acc


def clock_cosine_lr(lr: float, frac: float, step: int, warmup: int) -> float:
    """Learning rate at fraction `frac` of a wall-clock budget: linear warm-up over `warmup` steps, then a cosine
    decay to 5 % that ends when the clock does (a step-count schedule cannot, when the budget is time)."""
    return lr * (0.05 + 0.95 * 0.5 * (1.0 + float(np.cos(np.pi * min(1.0, frac))))) * min(1.0, (step + 1) / warmup)


def _jsonable(v):
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    return v


def load_generated(paths: list[Path], seed: int):
    """((images, labels) to train on, (images, labels) held out): images float in [0, 1], labels from the
    detector, 10 % of every pool held out."""
    from safetensors.torch import load_file

    from flowbp_core.world.recogniser import detected_labels

    xs = []
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"--generated {path}: no such file (make one with python -m "
                                    f"services.entrypoints.world.sample_pool --out {path})")
        xs.append(load_file(str(path))["images"].float() / 255.0)
    x = torch.cat(xs)
    lab = detected_labels(x.numpy())
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    n_val = max(1, x.shape[0] // 10)
    va, tr = perm[:n_val], perm[n_val:]
    return (x[tr], {k: v[tr] for k, v in lab.items()}), (x[va], {k: v[va] for k, v in lab.items()})


@dataclass(frozen=True, kw_only=True)
class RewardTrainOptions:
    """One training run of the recogniser; each field is a `--flag` of the command, its help says what it is."""

    out: Path = field(metadata={"help": "output folder (recogniser.safetensors, recogniser_log.jsonl)"})
    minutes: float = field(default=6.0, metadata={"help": "wall-clock training budget"})
    max_steps: int = field(default=100_000, metadata={"help": "step cap (the budget usually ends first)"})
    batch: int = field(default=64, metadata={"help": "images per step"})
    lr: float = field(default=2e-3, metadata={"help": "AdamW peak learning rate"})
    seed: int = field(default=0, metadata={"help": "data and init seed"})
    threads: int = field(default=0, metadata={"help": "torch threads (0: torch default)"})
    init: Path | None = field(default=None, metadata={"help": "continue from this recogniser checkpoint"})
    input_blur: float | None = field(default=None, metadata={
        "help": "Gaussian sigma the model applies to its input, 0..4 pixels (default: the init model's, else 0)"})
    generated: list[Path] = field(default_factory=list, metadata={"help": "sample_pool files of generator images"})
    generated_frac: float = field(default=0.5, metadata={"help": "share of each batch from generated, in [0, 1)"})
    adversarial_eps: float = field(default=0.0, metadata={
        "help": "L2 radius (pixel units in [0, 1]) of adversarial training, 0..8: half of each batch is replaced by "
                "its worst case within it (0: off)"})
    adversarial_steps: int = field(default=3, metadata={"help": "gradient steps of each adversarial example, 1..20"})

    def __post_init__(self) -> None:
        check_range("adversarial_eps", self.adversarial_eps, 0.0, 8.0)
        check_range("adversarial_steps", self.adversarial_steps, 1, 20)
        check_range("generated_frac", self.generated_frac, 0.0, 1.0, high_open=True)
        if self.input_blur is not None:
            check_range("input_blur", self.input_blur, 0.0, 4.0)


def train_reward(a: RewardTrainOptions, command: str) -> dict[str, float]:
    """Train until the budget or `max_steps` ends and save the checkpoint (`command` is its provenance); returns
    the final validation accuracies."""
    if a.threads:
        torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(a.seed)
    rng = np.random.default_rng(a.seed)
    g = torch.Generator().manual_seed(a.seed)
    pool = prompt_pool("train", 3000, seed=a.seed + 1) + prompt_pool("heldout", 600, seed=a.seed + 2)
    cfg = RecogniserConfig()
    model = Recogniser(cfg)
    if a.init is not None:
        from flowbp_core.world.reward import load_recogniser

        model, _ = load_recogniser(a.init)
        model.requires_grad_(True).train()
        cfg = model.cfg
    if a.input_blur is not None:
        cfg = RecogniserConfig(**{**cfg.as_dict(), "input_blur": a.input_blur})
        model.cfg = cfg  # the blur is a config switch: the weights carry over
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=1e-4)
    val_rng = np.random.default_rng(10_000 + a.seed)
    val_scenes = make_batch(1024, val_rng, pool)
    val_x = augment(torch.from_numpy(render_batch(val_scenes)), torch.Generator().manual_seed(10_000))
    val_lab = scene_labels(val_scenes)
    gen_train = gen_val = None
    if a.generated:
        gen_train, gen_val = load_generated(a.generated, a.seed)
        print(json.dumps({"generated_train": int(gen_train[0].shape[0]), "generated_val": int(gen_val[0].shape[0])}),
              flush=True)
    n_gen = int(round(a.batch * a.generated_frac)) if gen_train is not None else 0
    log_path = a.out / "recogniser_log.jsonl"
    log = open(log_path, "w")
    start, step, losses = time.time(), 0, []
    budget = a.minutes * 60
    while step < a.max_steps and time.time() - start < budget:
        scenes = make_batch(a.batch - n_gen, rng, pool)
        x = augment(torch.from_numpy(render_batch(scenes)), g)
        lab = scene_labels(scenes)
        if n_gen:
            idx = torch.randint(gen_train[0].shape[0], (n_gen,), generator=g)
            x = torch.cat([x, gen_train[0][idx]])
            lab = {k: torch.cat([lab[k], gen_train[1][k][idx]]) for k in lab}
        if a.adversarial_eps > 0:
            # every other image is replaced by its worst case: renders come first and the generator's samples
            # last, so alternating (not a front/back split) attacks half of each and keeps half of each clean
            adv = torch.arange(x.shape[0]) % 2 == 1
            x = x.clone()
            x[adv] = adversarial(model, x[adv], {k: v[adv] for k, v in lab.items()}, a.adversarial_eps,
                                 a.adversarial_steps)
        loss = recogniser_loss(model(x), lab)
        for pg in opt.param_groups:
            pg["lr"] = clock_cosine_lr(a.lr, (time.time() - start) / budget, step, warmup=100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        step += 1
        if step % 100 == 0:
            model.eval()
            rec = {"step": step, "loss": round(float(np.mean(losses[-100:])), 4),
                   "elapsed_min": round((time.time() - start) / 60, 2),
                   **{f"val_{k}": round(v, 4) for k, v in accuracy(model, val_x, val_lab).items()}}
            if gen_val is not None:
                rec.update({f"genval_{k}": round(v, 4) for k, v in accuracy(model, *gen_val).items()})
            if a.adversarial_eps > 0:  # accuracy under attack, on a fixed quarter of the validation set
                sub = {k: v[:256] for k, v in val_lab.items()}
                x_adv = adversarial(model, val_x[:256], sub, a.adversarial_eps, a.adversarial_steps)
                rec.update({f"advval_{k}": round(v, 4) for k, v in accuracy(model, x_adv, sub).items()})
            model.train()
            log.write(json.dumps(rec) + "\n")
            log.flush()
            print(json.dumps(rec), flush=True)
    model.eval()
    final = accuracy(model, val_x, val_lab)
    if gen_val is not None:
        final.update({f"generated_{k}": v for k, v in accuracy(model, *gen_val).items()})
    digest = save_checkpoint(
        dict(model.state_dict()), a.out / "recogniser.safetensors",
        config={"model": cfg.as_dict(), "train": {k: _jsonable(v) for k, v in asdict(a).items()}},
        data_seed=a.seed, command=command,
        extra={"steps": step, "train_minutes": round((time.time() - start) / 60, 2),
               "val_accuracy": {k: round(v, 4) for k, v in final.items()}},
    )
    print(json.dumps({"final": final, "steps": step, "sha256": digest}), flush=True)
    log.close()
    return final
