"""Train the embedded base model with the rectified-flow loss, by wall-clock budget (`train_base(options)`; the
command is `python -m services.entrypoints.world.train_base`, see README.md in this folder).

Data: captions of the training split (held-out combinations never appear), encoded once by MiniLM; every
step renders fresh scenes for the batch's captions, so the model never sees the same image twice. Loss:
|| v_theta(x_t, t) - (noise - x) ||^2 with logit-normal t. 10 % of captions are dropped to "" so that the
model supports classifier-free guidance. The EMA weights are what gets saved (float16, ~half the bytes),
every `ckpt_minutes` and at the end, together with a resumable state and a JSONL training log.

Each step's batch (captions, scenes, noise, t, dropout) is drawn from its own generator seeded by (seed, step),
so the data stream is the same whatever the number of render workers (`workers`, for a GPU that trains
faster than one core renders) and after a resume. `device="cuda"` trains on a GPU (bf16 autocast there too).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from flowbp_core.errors import ConfigError
from flowbp_core.world.assets import save_checkpoint
from flowbp_core.world.base_model import BaseModelConfig, build_transformer
from flowbp_core.world.data import batch_stream, prompt_pool
from flowbp_core.world.text import MiniLMEncoder


@dataclass(frozen=True, kw_only=True)
class BaseTrainOptions:
    """One training run of the base model; each field is a `--flag` of the command, its help says what it is."""

    out: Path = field(metadata={"help": "output folder (transformer.safetensors, log, state)"})
    minutes: float = field(default=30.0, metadata={"help": "wall-clock training budget"})
    max_steps: int = field(default=1_000_000, metadata={"help": "step cap (the budget usually ends first)"})
    batch: int = field(default=64, metadata={"help": "captions per step"})
    lr: float = field(default=1e-3, metadata={"help": "AdamW peak learning rate"})
    warmup: int = field(default=100, metadata={"help": "linear warm-up steps"})
    ema: float = field(default=0.995, metadata={"help": "EMA decay of the saved weights"})
    seed: int = field(default=0, metadata={"help": "data and init seed"})
    pool: int = field(default=6000, metadata={"help": "number of training captions"})
    layers: int = field(default=BaseModelConfig.num_layers, metadata={"help": "transformer blocks"})
    heads: int = field(default=BaseModelConfig.num_attention_heads, metadata={"help": "attention heads"})
    head_dim: int = field(default=BaseModelConfig.attention_head_dim, metadata={"help": "attention head width"})
    patch: int = field(default=BaseModelConfig.patch_size, metadata={"help": "patch size (pixels)"})
    ckpt_minutes: float = field(default=4.0, metadata={"help": "minutes between checkpoints"})
    threads: int = field(default=2, metadata={"help": "torch threads (the committed run: 2 on a quiet 2-core machine; "
                                                      "1 is faster on a shared CPU; 0: torch default)"})
    resume: bool = field(default=False, metadata={"help": "continue from <out>/train_state.pt"})
    no_autocast: bool = field(default=False, metadata={"help": "float32 without bf16 autocast"})
    device: str = field(default="cpu", metadata={"help": "cpu or cuda[:N]"})
    workers: int = field(default=0, metadata={"help": "render processes (0: render in the training process)"})

    def __post_init__(self) -> None:
        if self.device != "cpu" and not (self.device.startswith("cuda") and torch.cuda.is_available()):
            raise ConfigError("device", self.device, "cpu, or cuda[:N] on a machine with CUDA")
        if self.workers < 0:
            raise ConfigError("workers", self.workers, "an integer >= 0")


def _ema_update(ema: dict[str, torch.Tensor], model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        live = model.state_dict()
        # one fused kernel per tensor group instead of two launches per tensor (matters on a GPU)
        torch._foreach_lerp_([ema[k] for k in live], [v.detach().float() for v in live.values()], 1.0 - decay)


def train_base(a: BaseTrainOptions, command: str) -> None:
    """Train until the budget or `max_steps` ends; `command` is recorded in the checkpoint as its provenance."""
    if a.threads:
        torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(a.seed)
    dev = torch.device(a.device)
    cfg = BaseModelConfig(num_layers=a.layers, num_attention_heads=a.heads, attention_head_dim=a.head_dim,
                          patch_size=a.patch, pos_embed_max_size=32 // a.patch)
    model = build_transformer(cfg).to(dev).train()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.99), weight_decay=0.0)
    ema = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
    step, elapsed_before = 0, 0.0
    state_path = a.out / "train_state.pt"
    log_path = a.out / "train_log.jsonl"
    if a.resume and state_path.is_file():
        st = torch.load(state_path, weights_only=False, map_location="cpu")  # resumable on another device
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        ema = {k: v.to(dev) for k, v in st["ema"].items()}
        step, elapsed_before = st["step"], st["elapsed"]
        print(f"resumed at step {step} ({elapsed_before / 60:.1f} min done)", flush=True)
    elif log_path.exists():
        log_path.unlink()

    t0 = time.time()
    pool = prompt_pool("train", a.pool, seed=a.seed)
    enc = MiniLMEncoder()
    texts = [it.text for it in pool]
    cond = enc.encode(texts)
    empty = enc.encode([""])
    ctx, pooled = cond["prompt_embeds"].to(dev), cond["pooled_prompt_embeds"].to(dev)
    empty = {k: v.to(dev) for k, v in empty.items()}
    print(f"model {n_params / 1e6:.2f} M params; {len(pool)} captions encoded in {time.time() - t0:.1f} s", flush=True)

    run_cfg = {"model": cfg.diffusers_kwargs(),
               "train": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(a).items()}}
    budget = a.minutes * 60.0
    start = time.time() - elapsed_before
    last_ckpt = time.time()
    ema_losses: list[float] = []
    log_f = open(log_path, "a")

    def checkpoint(final: bool) -> None:
        elapsed = time.time() - start
        half = {k: v.to("cpu", torch.float16) for k, v in ema.items()}
        digest = save_checkpoint(half, a.out / "transformer.safetensors", config=run_cfg, data_seed=a.seed,
                                 command=command,
                                 extra={"steps": step, "train_minutes": round(elapsed / 60, 2), "params": n_params,
                                        "final_loss_ema": round(float(np.mean(ema_losses[-100:])) if ema_losses
                                                                else float("nan"), 5)})
        tmp = state_path.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "ema": ema, "step": step,
                    "elapsed": elapsed}, tmp)
        os.replace(tmp, state_path)
        print(f"checkpoint at step {step} ({elapsed / 60:.1f} min){' FINAL' if final else ''} "
              f"sha256={digest[:12]}", flush=True)

    stream = batch_stream(pool, a.seed, step, a.batch, a.workers)
    while step < a.max_steps and (time.time() - start) < budget:
        ts = time.time()
        b = next(stream)
        idx, drop = b.index.to(dev), b.drop.to(dev)
        x, noise, sigma = b.x.to(dev), b.noise.to(dev), b.sigma.to(dev)
        c, p = ctx[idx].clone(), pooled[idx].clone()
        c[drop], p[drop] = empty["prompt_embeds"][0], empty["pooled_prompt_embeds"][0]
        s4 = sigma.view(-1, 1, 1, 1)
        xt = (1.0 - s4) * x + s4 * noise
        lr = a.lr * min(1.0, (step + 1) / a.warmup)
        for gparam in opt.param_groups:
            gparam["lr"] = lr
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=not a.no_autocast):
            pred = model(hidden_states=xt, encoder_hidden_states=c, pooled_projections=p, timestep=sigma * 1000.0,
                         return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred.float(), noise - x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if not torch.isfinite(loss):  # (one host sync a step: cheap next to a step even on a GPU)
            print(f"step {step}: non-finite loss, skipped", flush=True)
            step += 1
            continue
        opt.step()
        decay = min(a.ema, (1 + step) / (10 + step))
        _ema_update(ema, model, decay)
        step += 1
        ema_losses.append(float(loss.detach()))
        dt = time.time() - ts
        if step % 25 == 0 or step == 1:
            rec = {"step": step, "loss": round(float(np.mean(ema_losses[-25:])), 5), "grad_norm": round(float(gn), 4),
                   "lr": lr, "step_s": round(dt, 3), "elapsed_min": round((time.time() - start) / 60, 2)}
            log_f.write(json.dumps(rec) + "\n")
            log_f.flush()
            print(json.dumps(rec), flush=True)
        if time.time() - last_ckpt > a.ckpt_minutes * 60:
            checkpoint(False)
            last_ckpt = time.time()
    checkpoint(True)
    log_f.close()
