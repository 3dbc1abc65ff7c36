"""Train the attribute recogniser behind the "world_attributes" reward on rendered scenes.

    python -m flowbp_core.world.train_reward --out /tmp/world_rec [--minutes 20] [--init ckpt]
    python -m flowbp_core.world.publish recogniser /tmp/world_rec

Scenes: 1-3 random objects (and 5 % empty backgrounds, and scenes drawn from prompt specs so that three
objects of one kind are common), with random Gaussian blur, pixel noise and brightness jitter so that the
recogniser also reads a generator's soft samples. Reports per-head accuracy on a fixed validation set.

`--generated POOL [POOL ...]` (files of `sample_pool`) mixes the generator's own images into every batch
(`--generated-frac` of it), labelled by what the detector finds in them (`recogniser.detected_labels`): the
generator's artefacts then carry their true content instead of whatever the render-trained recogniser reads
into them, which is what alignment otherwise exploits. 10 % of each pool is held out for validation.

`--adversarial-eps EPS` trains half of each batch on its worst case within an L2 ball of radius EPS (projected
gradient ascent, `--adversarial-steps`), and logs the validation accuracy under that attack (`advval_*`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

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
                                    "flowbp_core.world.sample_pool --out {path})")
        xs.append(load_file(str(path))["images"].float() / 255.0)
    x = torch.cat(xs)
    lab = detected_labels(x.numpy())
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    n_val = max(1, x.shape[0] // 10)
    va, tr = perm[:n_val], perm[n_val:]
    return (x[tr], {k: v[tr] for k, v in lab.items()}), (x[va], {k: v[va] for k, v in lab.items()})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--minutes", type=float, default=6.0)
    p.add_argument("--max-steps", type=int, default=100_000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--init", type=Path, default=None, help="continue from this recogniser checkpoint")
    p.add_argument("--input-blur", type=float, default=None,
                   help="Gaussian sigma the model applies to its input (default: the --init model's, else 0)")
    p.add_argument("--generated", type=Path, nargs="*", default=[], help="sample_pool files of generator images")
    p.add_argument("--generated-frac", type=float, default=0.5, help="share of each batch from --generated")
    p.add_argument("--adversarial-eps", type=float, default=0.0,
                   help="L2 radius (pixel units in [0, 1]) of adversarial training: half of each batch is replaced "
                        "by its worst case within it (0: off)")
    p.add_argument("--adversarial-steps", type=int, default=3, help="gradient steps of each adversarial example")
    a = p.parse_args(argv)
    if not 0.0 <= a.adversarial_eps <= 8.0:
        p.error(f"--adversarial-eps={a.adversarial_eps}: allowed range is [0, 8]")
    if not 1 <= a.adversarial_steps <= 20:
        p.error(f"--adversarial-steps={a.adversarial_steps}: allowed range is 1..20")
    if not 0.0 <= a.generated_frac < 1.0:
        p.error(f"--generated-frac={a.generated_frac}: must be in [0, 1)")
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
        if not 0.0 <= a.input_blur <= 4.0:
            p.error(f"--input-blur={a.input_blur}: allowed range is [0, 4] pixels")
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
    command = "python -m flowbp_core.world.train_reward " + " ".join(sys.argv[1:] if argv is None else argv)
    digest = save_checkpoint(
        dict(model.state_dict()), a.out / "recogniser.safetensors",
        config={"model": cfg.as_dict(), "train": {k: _jsonable(v) for k, v in vars(a).items()}},
        data_seed=a.seed, command=command,
        extra={"steps": step, "train_minutes": round((time.time() - start) / 60, 2),
               "val_accuracy": {k: round(v, 4) for k, v in final.items()}},
    )
    print(json.dumps({"final": final, "steps": step, "sha256": digest}), flush=True)
    log.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
