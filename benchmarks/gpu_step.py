"""Real-size cost of one FlowBP learner step on a GPU: SD3.5-Medium, FLUX.1-dev, FLUX.2-Klein-base-9B.

Each backbone is built at its real configuration with random weights (costs depend on shapes, not values) in
bf16 on CUDA, through the same adapters training uses (`flowbp_core.backbones`), with a ViT-H/14-sized reward
(transformers `CLIPVisionModelWithProjection`, random weights: the size of HPSv2.1 / PickScore). At 512 px,
batch 1, N = 25, gradient checkpointing on, for full fine-tuning and for LoRA, it measures in one run:

  floor        N no-grad guided steps (the sampling floor; CFG = 2 forwards a step where the model uses it)
  rollout      the cached rollout (`flowbp_core.sampling.rollout`, keeping what the method needs)
  fwd_bwd      one guided velocity with grad + backward (the unit cost of an active step)
  decode_rew   VAE decode + reward forward + backward to the latent
  flowbp_sparse (K=4), flowbp_lagrange (the backbone's paper preset), draft_k (K=4): rollout + endpoint +
               decode + reward + backward, i.e. one learner step without the optimizer update

and prints each beside the ideal floor + K x fwd_bwd + decode_rew (the issue's 1.15x target for Sparse), then
writes benchmarks/results/gpu_step_<card>.json. No optimizer state is held (AdamW for a full fine-tune adds two
fp32 copies of the weights; the step's activation and time costs do not depend on it).

`--smoke` runs the same code on tiny configs (CPU is fine) so CI keeps the script working; it says so, and
says when no CUDA device is present. The GPU machine has torch and transformers but no diffusers/peft: put
their wheels (and accelerate's) in `.whl/` (pure Python, imported straight from the wheel files; `--wheels`).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import glob
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def ensure_importable(wheels: str) -> list[str]:
    """Import diffusers/peft (and what they need beyond transformers, e.g. accelerate) from the wheel files in
    `wheels` when they are not installed: pure-Python wheels are zip archives Python imports from directly.
    Returns the wheels put on sys.path."""
    missing = []
    for mod in ("diffusers", "peft"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if not missing:
        return []
    found = sorted(glob.glob(os.path.join(wheels, "*.whl")))
    if not found:
        raise SystemExit(f"{missing} not installed and no wheels in {wheels!r}: on a machine with network run "
                         f"`pip download --no-deps diffusers==0.42.1 peft==0.21.2 accelerate==1.15.0 -d {wheels}`")
    for w in found:
        sys.path.insert(0, w)
    for mod in missing:
        __import__(mod)
    return found


# ------------------------------------------------------------------------------------------------ records
@dataclass
class Row:
    backbone: str
    mode: str  # "full" | "lora"
    item: str
    seconds: float | None = None
    peak_gib: float | None = None
    k: int | None = None
    status: str = "ok"  # ok | oom | skipped | error
    note: str = ""


@dataclass
class Report:
    device: str
    cuda: bool
    smoke: bool
    torch: str
    resolution: int
    n_steps: int
    batch: int
    gradient_checkpointing: bool
    lora_rank: int
    params_b: dict[str, float] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)
    summary: list[dict] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------- timing
class Meter:
    def __init__(self, dev: torch.device):
        self.dev = dev

    def sync(self):
        if self.dev.type == "cuda":
            torch.cuda.synchronize()

    def reset(self):
        gc.collect()
        if self.dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak(self) -> float | None:
        return torch.cuda.max_memory_allocated() / 2**30 if self.dev.type == "cuda" else None

    def run(self, fn, warm: int = 1, reps: int = 1) -> tuple[float, float | None]:
        """Median wall time of `reps` runs after `warm` untimed ones, and the peak memory over all of them."""
        self.reset()
        for _ in range(warm):
            fn()
        self.sync()
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            self.sync()
            ts.append(time.perf_counter() - t)
        return sorted(ts)[len(ts) // 2], self.peak()


# ----------------------------------------------------------------------------------------- model stand-ins
class ShapeOnlyTextEncoder:
    """Prompt embeddings of the real shapes (random, fixed per prompt): text encoders run once per prompt and
    are cached, so they are not part of a learner step; building T5-XXL / Qwen3-8B here would only cost time."""

    def __init__(self, seq_len: int, dim: int, pooled_dim: int, device, dtype):
        self.seq_len, self.dim, self.pooled_dim = seq_len, dim, pooled_dim
        self.device, self.dtype = device, dtype

    def encode(self, prompts):
        g = torch.Generator().manual_seed(sum(map(ord, "".join(prompts))))
        states = torch.randn(len(prompts), self.seq_len, self.dim, generator=g).to(self.device, self.dtype)
        pooled = None
        if self.pooled_dim:
            pooled = torch.randn(len(prompts), self.pooled_dim, generator=g).to(self.device, self.dtype)
        return states, pooled


class ViTReward(torch.nn.Module):
    """CLIP-style preference reward: <image embedding, fixed text embedding>, differentiable preprocessing."""

    def __init__(self, cfg):
        super().__init__()
        from transformers import CLIPVisionModelWithProjection

        self.clip = CLIPVisionModelWithProjection(cfg)
        self.register_buffer("text", torch.nn.functional.normalize(torch.randn(cfg.projection_dim), dim=0))
        self.register_buffer("mean", torch.tensor([0.4815, 0.4578, 0.4082]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.2686, 0.2613, 0.2758]).view(1, 3, 1, 1))
        self.size = cfg.image_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.interpolate(images, size=(self.size, self.size), mode="bicubic", align_corners=False)
        x = ((x - self.mean) / self.std).to(next(self.clip.parameters()).dtype)
        e = torch.nn.functional.normalize(self.clip(pixel_values=x).image_embeds.float(), dim=-1)
        return e @ self.text.float()


def vit_config(smoke: bool):
    from transformers import CLIPVisionConfig

    if smoke:
        return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                image_size=28, patch_size=14, projection_dim=16)
    # ViT-H/14 (OpenCLIP ViT-H-14: the image tower of HPSv2.1 and PickScore), 0.63 B parameters
    return CLIPVisionConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                            image_size=224, patch_size=14, projection_dim=1024, hidden_act="gelu")


def build_backbone(name: str, smoke: bool, dev: torch.device, dtype: torch.dtype, res: int):
    """The family's adapter around random real-size (or tiny) modules, built directly on the device in `dtype`."""
    from diffusers import (AutoencoderKL, AutoencoderKLFlux2, Flux2Transformer2DModel, FluxTransformer2DModel,
                           SD3Transformer2DModel)

    from flowbp_core.backbones import flux1, flux2, sd3

    fam = {"sd3": (sd3, sd3.SD3Backbone, SD3Transformer2DModel, AutoencoderKL),
           "flux1": (flux1, flux1.Flux1Backbone, FluxTransformer2DModel, AutoencoderKL),
           "flux2": (flux2, flux2.Flux2Backbone, Flux2Transformer2DModel, AutoencoderKLFlux2)}[name]
    mod, cls, tcls, vcls = fam
    tcfg = mod.TINY_TRANSFORMER if smoke else mod.REAL_TRANSFORMER
    vcfg = mod.TINY_VAE if smoke else mod.REAL_VAE
    text = dict(seq_len=mod.TINY_TEXT_LEN, dim=tcfg["joint_attention_dim"],
                pooled_dim=tcfg.get("pooled_projection_dim", 0)) if smoke else mod.REAL_TEXT
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise in bf16 directly: a 12 B model in fp32 would not fit
    try:
        with torch.device(dev):
            transformer, vae = tcls(**tcfg), vcls(**vcfg)
    finally:
        torch.set_default_dtype(prev)
    te = ShapeOnlyTextEncoder(text["seq_len"], text["dim"], text["pooled_dim"], dev, dtype)
    return cls(transformer, vae, te, preset=mod.PRESET, height=res, width=res)


# ------------------------------------------------------------------------------------------------ the run
def reward_step(method, bb, reward, *, velocity, noise, sigmas, cond, prompts, n: int):
    """One learner step without the optimizer (rollout, the method's endpoint, decode, reward, backward), as a
    callable for the timers; the plan is drawn from a fixed seed so that every rep does the same work."""
    from flowbp_core.sampling import rollout

    def step():
        plan = method.plan(n, torch.Generator().manual_seed(114))
        cache = rollout(velocity, noise, sigmas, cond=cond, prompts=prompts, needs=method.needs(plan, n))
        ep = method.endpoint(cache.with_plan(plan), velocity)
        r = reward(bb.decode(ep.value))
        (-(ep.weights.to(r) * r).mean()).backward()

    return step


def measure_backbone(name: str, args, dev: torch.device, dtype: torch.dtype, report: Report, t_start: float):
    meter = Meter(dev)
    _measure_modes(name, args, dev, dtype, report, t_start, meter)
    meter.reset()  # the backbone, reward and closures are freed with _measure_modes' frame: drop their cached blocks


def _measure_modes(name: str, args, dev: torch.device, dtype: torch.dtype, report: Report, t_start: float,
                   meter: Meter):
    from flowbp_core import methods
    from flowbp_core.backbones import LoRAConfig
    from flowbp_core.sampling import rollout

    res = args.res
    bb = build_backbone(name, args.smoke, dev, dtype, res)
    report.params_b[name] = sum(p.numel() for p in bb.transformer.parameters()) / 1e9
    reward = ViTReward(vit_config(args.smoke)).to(dev, dtype).eval().requires_grad_(False)
    n = args.steps
    sched = bb.schedule(n)
    sig = [float(s) for s in sched.sigmas]
    prompts = [f"benchmark prompt {i}" for i in range(args.batch)]
    cond = bb.encode_prompts(prompts)
    velocity = bb.bind(cond)
    noise = torch.randn(bb.latent_shape(args.batch), generator=torch.Generator().manual_seed(0)).to(dev, dtype)
    if args.ckpt:
        bb.enable_gradient_checkpointing()

    def over_budget() -> bool:
        return time.perf_counter() - t_start > args.budget_s

    def record(mode, item, fn, k=None, warm=1):
        if over_budget():
            report.rows.append(Row(name, mode, item, k=k, status="skipped", note="time budget"))
            print(f"  {name:6s} {mode:4s} {item:24s} skipped (time budget)", flush=True)
            return None
        try:
            s, peak = meter.run(fn, warm=0 if args.smoke else warm)
            row = Row(name, mode, item, s, peak, k)
        except torch.OutOfMemoryError:
            row = Row(name, mode, item, k=k, status="oom")
        for p in bb.trainable_parameters():
            p.grad = None
        meter.reset()
        report.rows.append(row)
        peak_s = "-" if row.peak_gib is None else f"{row.peak_gib:6.1f} GiB"
        sec_s = "-" if row.seconds is None else f"{row.seconds:7.3f} s"
        print(f"  {name:6s} {mode:4s} {item:24s} {sec_s:>10s} {peak_s:>11s} {row.status}", flush=True)
        return row

    @torch.no_grad()
    def floor():
        x = noise
        for i in range(n):
            x = x + (sig[i + 1] - sig[i]) * velocity(x, sig[i])
        return x

    def fwd_bwd():
        x = noise.detach()
        bb.velocity(x, sig[n // 2], cond).float().pow(2).mean().backward()

    z_end = floor().detach()

    def decode_reward():
        z = z_end.clone().requires_grad_(True)
        reward(bb.decode(z)).sum().backward()

    def learner_step(method_name, overrides):
        method = methods.build(method_name, backbone=bb.preset.method_preset, **overrides)
        return reward_step(method, bb, reward, velocity=velocity, noise=noise, sigmas=sched.sigmas, cond=cond,
                           prompts=prompts, n=n), method

    for mode in args.modes:
        if mode == "lora":
            bb.apply_lora(LoRAConfig(rank=args.lora_rank))
            if args.ckpt:
                bb.enable_gradient_checkpointing()
        else:
            bb.enable_full_finetune()
        rows = {}
        rows["floor"] = record(mode, "floor", floor)
        rows["fwd_bwd"] = record(mode, "fwd_bwd", fwd_bwd)
        rows["decode_rew"] = record(mode, "decode_rew", decode_reward)
        for item, method_name, overrides, k in (("flowbp_sparse", "flowbp_sparse", {"k": args.k}, args.k),
                                                ("flowbp_lagrange", "flowbp_lagrange", {}, None),
                                                ("draft_k", "draft_k", {"k": args.k}, args.k)):
            step, method = learner_step(method_name, overrides)
            if item == "flowbp_sparse":
                needs = method.needs(method.plan(n, torch.Generator().manual_seed(114)), n)
                rows["rollout"] = record(mode, "rollout", lambda: rollout(velocity, noise, sched.sigmas, cond=cond,
                                                                           prompts=prompts, needs=needs))
            rows[item] = record(mode, item, step, k=k, warm=0)
        report.summary.append(summarise(name, mode, rows, args.k))


def summarise(name: str, mode: str, rows: dict, k: int) -> dict:
    """Sparse against the ideal floor + K x fwd_bwd + decode_rew, and its peak against one fwd_bwd's."""
    def val(item, attr):
        r = rows.get(item)
        return None if r is None or r.status != "ok" else getattr(r, attr)

    out = {"backbone": name, "mode": mode}
    f, fb, dr, sp = (val(i, "seconds") for i in ("floor", "fwd_bwd", "decode_rew", "flowbp_sparse"))
    if None not in (f, fb, dr, sp):
        ideal = f + k * fb + dr
        out.update(ideal_s=ideal, sparse_s=sp, sparse_over_ideal=sp / ideal, target_met=sp / ideal <= 1.15)
    for item in ("rollout", "flowbp_sparse", "flowbp_lagrange", "draft_k"):
        t = val(item, "seconds")
        if f and t is not None:
            out[f"{item}_over_floor"] = t / f
    pm, pfb = val("flowbp_sparse", "peak_gib"), val("fwd_bwd", "peak_gib")
    if pm is not None and pfb:
        out.update(sparse_peak_over_fwd_bwd=pm / pfb, memory_target_met=pm / pfb <= 1.15)
    return out


def card_slug(dev: torch.device, smoke: bool) -> str:
    if dev.type != "cuda":
        return "smoke_cpu" if smoke else "cpu"
    slug = re.sub(r"[^a-z0-9]+", "_", torch.cuda.get_device_name().lower()).strip("_")
    return f"smoke_{slug}" if smoke else slug


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny configs (runs on CPU); checks the script, not costs")
    ap.add_argument("--backbones", default="sd3,flux1,flux2")
    ap.add_argument("--modes", default="full,lora", help="full and/or lora (full first: LoRA is added in place)")
    ap.add_argument("--res", type=int, default=None, help="image side in pixels (512; smoke: 32)")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--no-ckpt", dest="ckpt", action="store_false", help="disable gradient checkpointing")
    ap.add_argument("--budget-s", type=float, default=450.0, help="skip what is left after this many seconds")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--wheels", default=str(ROOT / ".whl"))
    args = ap.parse_args(argv)
    args.backbones = [b.strip() for b in args.backbones.split(",") if b.strip()]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in args.modes if m not in ("full", "lora")]
    if bad:
        ap.error(f"--modes: {bad} not in full, lora")
    args.res = args.res or (32 if args.smoke else 512)

    cuda = torch.cuda.is_available()
    if not cuda:
        print("NO CUDA DEVICE AVAILABLE: " + ("running the smoke configuration on the CPU; the times below are "
              "not GPU numbers." if args.smoke else "the real-size benchmark needs a GPU. Use --smoke for the CPU "
              "check of this script."), flush=True)
        if not args.smoke:
            return 2
    added = ensure_importable(args.wheels)
    if added:
        print(f"imported from wheels: {added}")
    if cuda:
        # cuDNN's attention backward failed on FLUX shapes (h100-anchor.md); flash / efficient SDPA are used instead
        torch.backends.cuda.enable_cudnn_sdp(False)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    threads = torch.get_num_threads()
    if not cuda:
        torch.set_num_threads(1)  # tiny models: threading overhead exceeds the work (restored at the end)
    try:
        return _run(args, cuda)
    finally:
        torch.set_num_threads(threads)


def _run(args, cuda: bool) -> int:
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    name = torch.cuda.get_device_name() if cuda else "cpu"
    report = Report(device=name, cuda=cuda, smoke=args.smoke, torch=torch.__version__, resolution=args.res,
                    n_steps=args.steps, batch=args.batch, gradient_checkpointing=args.ckpt, lora_rank=args.lora_rank)
    print(f"device {name}; {'smoke' if args.smoke else 'real'} configs; {args.res} px, N={args.steps}, "
          f"batch {args.batch}, K={args.k}, checkpointing {'on' if args.ckpt else 'off'}", flush=True)
    t0 = time.perf_counter()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"gpu_step_{card_slug(dev, args.smoke)}.json"
    for b in args.backbones:
        torch.manual_seed(0)
        try:
            measure_backbone(b, args, dev, dtype, report, t0)
        except torch.OutOfMemoryError as e:
            report.rows.append(Row(b, "-", "build", status="oom", note=str(e)[:200]))
        out.write_text(json.dumps(dataclasses.asdict(report), indent=2))  # partial results survive a timeout
    print("\nSparse vs floor + K x fwd_bwd + decode/reward (target <= 1.15), peak vs one fwd_bwd (<= 1.15):")
    if args.smoke:
        print("  (smoke run: tiny models, so these ratios say nothing about the real-size targets)")
    for s in report.summary:
        print("  " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in s.items()))
    out.write_text(json.dumps(dataclasses.asdict(report), indent=2))
    print(f"wrote {out} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
