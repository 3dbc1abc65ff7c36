"""Rollout, learner step and same-GPU weight handoff at SD3.5-Medium size on one GPU (issue 16, item 4).

The SD3.5-Medium transformer is built from its real config (`flowbp_core.backbones.sd3.REAL_TRANSFORMER`,
random weights: costs depend on shapes, not values) in bf16, through the adapter training uses, as
`gpu_step.py` builds it. At 512 px it measures, within a total time budget (default 540 s, so the run ends
inside 9 minutes on one H200; what does not fit is recorded as skipped, with the reason):

  rollout      ms per sample-step of the cached no-grad rollout (`flowbp_core.sampling.rollout`, the step's
               prompts in one micro-batch of `micro_batched`, CFG's two branches in one transformer batch) at
               batch 1 / 4 / 16, for the plain model, LoRA merged into it (`backbone.merged_lora`, i.e.
               `MergedLoRA`) and LoRA unmerged (peft adapter), eager and compiled as `runtime.compile_rollout`
               compiles (`compile_for_sampling`: static shapes, CUDA graphs);
  merge        the time of one `MergedLoRA.load` (what each weight sync costs a rollout worker);
  learner      one flowbp_sparse step (K = 4, N = 25, batch 1, LoRA, gradient checkpointing; rollout + endpoint
               + VAE decode + ViT-H reward + backward, no optimizer update), as gpu_step.py measures it;
  handoff      the full trainable state of a full fine-tune (every transformer weight, 4.5 GB in bf16) handed
               to a second process as `collective` hands it to a rollout worker on the learner's GPU: packed
               into 64 MiB buckets and shared (`services.runtime.buckets`: CUDA IPC handles on a GPU; shared
               memory on the CPU), mapped and copied into the reader's own weights: first handoff and the
               median of the next ones, and of those the publish (pack + share) alone.

The arithmetic limit. One transformer forward over n_i image tokens (n_i = (res / 16)^2 = 1024 at 512 px) and
n_t text tokens (333: 77 CLIP + 256 T5), width D = heads x head_dim = 1536, L = 24 blocks of which L2 = 13 have
the second (image-only) attention, hidden width 4D, counts 2 x (multiply-adds) of every matmul:
  linear = 2 x [ n_i x 64 D                      patch embedding (16 channels x 2 x 2)
               + n_t x 4096 D                    context embedder
               + (256 + 2048) D + 2 D^2          timestep and pooled-text embedders (once a sample)
               + sum over blocks of
                   D x 9D (L2 blocks) or 6D      image AdaLN modulation (once a sample)
                   D x 6D (last block: 2D)       text AdaLN modulation
                   n_i x 12 D^2                  image q, k, v, out (4 D^2) + feed-forward (8 D^2)
                   n_t x 12 D^2 (last: 3 D^2)    text q, k, v, out, feed-forward (last block: q, k, v only)
               + L2 x n_i x 4 D^2                second attention's q, k, v, out
               + D x 2D + n_i x 64 D ]           final modulation and output projection
  attention = 4 D x [ L x (n_i + n_t)^2 + L2 x n_i^2 ]   (Q K^T and A V)
At SD3.5-M's size this is 2.09 + 0.36 = 2.44 TFLOP a transformer row: about 0.77 B weights act on each token
(the 0.7 B of AdaLN modulation act once a sample). `h100-anchor.md`'s 4.4 TFLOP assumed 1.5 B per token, so its
limit is about 1.8x too high. A guided sample-step runs two rows (CFG): 4.89 TFLOP, so the limit per
sample-step is 2 x (linear + attention) / peak = 4.94 ms at the bf16 dense peak of BF16_DENSE_PEAK_TFLOPS
(H100 / H200 SXM: 989 TFLOP/s; the anchor measured 790 achievable on an H100). The linear part equals a count by
forward hooks on every Linear / Conv2d (recorded beside it; tests/backbones/test_gpu_rollout_smoke.py checks
both the tiny and, on the meta device, the real config).

Targets (issue 16), computed from the measured numbers: compiled merged batch 16 / the limit <= 1.3; merged /
plain sampling <= 1.05 at each batch and mode measured for both.

`--smoke` runs it all on the CPU on the tiny SD3 config (float32, `torch.compile(backend="eager")`, which
traces but does not generate kernels), so the script and its JSON stay tested; its times are not GPU numbers.
On the GPU machine run it through `benchmarks/gpu_checks.sh` (CHECKS=rollout), which installs the diffusers
wheel first. Writes `<out>/gpu_rollout_<card>.json` after each stage, so a timeout keeps what was measured.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

HERE = Path(__file__).resolve().parent
for p in (str(HERE.parent), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

import gpu_step  # noqa: E402  (benchmarks/: build_backbone, Meter, ViTReward, card_slug)

BF16_DENSE_PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4}  # SXM datasheet, dense (no sparsity)
DEFAULT_PEAK_TFLOPS = 989.4  # an unlisted card (and the CPU smoke run) is held to the H100's peak
COMPILE_NEED_S = 180.0  # a real-size compile took 60-100 s per shape on an H100 (h100-anchor.md), plus margin
BATCHES = (1, 4, 16)


def transformer_flops(cfg: dict, n_img: int, n_txt: int) -> dict[str, float]:
    """Matmul FLOPs of one SD3 transformer forward for one row (the docstring's formula)."""
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    layers, dual = cfg["num_layers"], len(cfg["dual_attention_layers"])
    patch_in = cfg["in_channels"] * cfg["patch_size"] ** 2
    patch_out = cfg["patch_size"] ** 2 * cfg["out_channels"]
    mac = n_img * patch_in * d + n_txt * cfg["joint_attention_dim"] * cfg["caption_projection_dim"]
    mac += (256 + cfg["pooled_projection_dim"]) * d + 2 * d * d
    for i in range(layers):
        last = i == layers - 1
        mac += d * (9 * d if i in cfg["dual_attention_layers"] else 6 * d) + d * (2 * d if last else 6 * d)
        mac += n_img * 12 * d * d + n_txt * (3 if last else 12) * d * d
    mac += dual * n_img * 4 * d * d + d * 2 * d + n_img * d * patch_out
    attention = 4 * d * (layers * (n_img + n_txt) ** 2 + dual * n_img ** 2)
    return {"linear_per_row": 2.0 * mac, "attention_per_row": float(attention),
            "per_row": 2.0 * mac + attention, "per_sample_step": 2 * (2.0 * mac + attention)}


@torch.no_grad()
def hooked_linear_flops(transformer: torch.nn.Module, call) -> float:
    """2 x multiply-adds of every Linear and Conv2d that `call()` runs through `transformer` (forward hooks)."""
    total = [0]

    def hook(mod, inp, out):
        if isinstance(mod, torch.nn.Linear):
            total[0] += 2 * (inp[0].numel() // mod.in_features) * mod.in_features * mod.out_features
        else:
            k = mod.weight[0].numel()  # in_channels x kh x kw per output value
            total[0] += 2 * out.numel() * k

    mods = [m for m in transformer.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    handles = [m.register_forward_hook(hook) for m in mods]
    try:
        call()
    finally:
        for h in handles:
            h.remove()
    return float(total[0])


class Run:
    """The report being built, the time budget and the file it is written to after every stage."""

    def __init__(self, args, dev: torch.device, out: Path):
        self.args, self.dev, self.out, self.t0 = args, dev, out, time.perf_counter()
        self.meter = gpu_step.Meter(dev)
        self.report: dict = {"rollout": [], "skipped": [], "budget_s": args.budget_s}

    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.t0)

    def fits(self, what: str, need_s: float) -> bool:
        """Whether `need_s` seconds are left; otherwise record `what` as skipped."""
        if self.left() >= need_s:
            return True
        self.report["skipped"].append({"item": what, "reason": f"time budget: {self.left():.0f} s left, "
                                       f"needs about {need_s:.0f} s"})
        print(f"  skipped {what} (time budget)", flush=True)
        return False

    def save(self) -> None:
        self.report["elapsed_s"] = time.perf_counter() - self.t0
        self.report["targets"] = targets(self.report)
        self.out.write_text(json.dumps(self.report, indent=2))


def rollout_ms(run: Run, bb, batch: int, tag: str, compiled: bool) -> None:
    """ms per sample-step of a `batch`-prompt cached rollout of `run.args.steps` steps (one micro-batch)."""
    from flowbp_core.sampling import micro_batched, rollout

    if not run.fits(f"rollout {tag} batch {batch}{' compiled' if compiled else ''}",
                    COMPILE_NEED_S if compiled and not run.args.smoke else 5.0):
        return
    prompts = [f"benchmark prompt {i}" for i in range(batch)]
    cond = bb.encode_prompts(prompts)
    velocity = micro_batched(bb.bind, cond, batch, batch, static=compiled)  # the rollout worker's call
    noise = torch.randn(bb.latent_shape(batch), generator=torch.Generator().manual_seed(batch))
    noise = noise.to(run.dev, bb.dtype)
    sigmas = bb.schedule(run.args.steps).sigmas
    t = time.perf_counter()
    s, _ = run.meter.run(lambda: rollout(velocity, noise, sigmas, cond=cond, prompts=prompts), warm=1, reps=2)
    row = {"variant": tag, "compiled": compiled, "batch": batch, "steps": run.args.steps,
           "ms_per_sample_step": 1e3 * s / (run.args.steps * batch), "wall_s": time.perf_counter() - t}
    run.report["rollout"].append(row)
    print(f"  rollout {tag:8s} {'compiled' if compiled else 'eager':8s} batch {batch:2d}: "
          f"{row['ms_per_sample_step']:8.2f} ms per sample-step", flush=True)
    run.save()


def random_lora_state(merged, seed: int) -> dict[str, torch.Tensor]:
    """A non-zero adapter state of `merged`'s keys and shapes (B != 0, so the merge changes the weights)."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=g) * 0.01 for k, shape in merged.shapes.items()}


def zero_lora_state(merged) -> dict[str, torch.Tensor]:
    return {k: torch.zeros(shape) for k, shape in merged.shapes.items()}


def _handoff_child(q_in, q_out) -> None:
    """The receiving process, as a rollout worker on the learner's device reads a `collective` publish: map each
    shared bucket, copy its tensors out (`buckets.mapped`) and load them into its own weights, then acknowledge."""
    from services.runtime.buckets import mapped

    dst = None
    while True:
        msg = q_in.get()
        if msg is None:
            return
        if msg == "ping":
            q_out.put("pong")
            continue
        state = mapped(*msg)
        if dst is None:
            dst = {k: torch.empty_like(v) for k, v in state.items()}
        for k, v in state.items():
            dst[k].copy_(v)
        if next(iter(dst.values())).is_cuda:
            torch.cuda.synchronize()
        del msg, state
        q_out.put(sum(v.numel() * v.element_size() for v in dst.values()))


def measure_handoff(run: Run, state: dict[str, torch.Tensor]) -> None:
    """Hand `state` to a second process `reps + 1` times by the runtime's same-device path (`collective` with
    `runtime.weight_sync_same_device`): pack into 64 MiB buckets on the device and share them (`buckets.pack`,
    `buckets.share`: CUDA IPC handles on a GPU, shared memory on the CPU), timed to the reader's ack."""
    from services.runtime.buckets import pack, share

    if not run.fits("handoff", 60.0):
        return
    ctx = mp.get_context("spawn")
    q_in, q_out = ctx.Queue(), ctx.Queue()
    child = ctx.Process(target=_handoff_child, args=(q_in, q_out), daemon=True)
    child.start()
    try:
        q_in.put("ping")
        q_out.get(timeout=120)
        times, publish, nbytes = [], [], 0
        for _ in range(run.args.handoff_reps + 1):
            run.meter.sync()
            t = time.perf_counter()
            layout, buffers = pack(state, 64 << 20, run.dev)
            buffers, blobs = share(buffers)
            if blobs is None:
                raise RuntimeError("buckets.share could not share the packed buffers (see the warning above)")
            run.meter.sync()
            publish.append(time.perf_counter() - t)
            q_in.put((blobs, layout))
            nbytes = q_out.get(timeout=120)
            times.append(time.perf_counter() - t)
            del buffers, blobs  # the reader is done with them, as the learner drops a publish no request names
        warm = sorted(times[1:])[len(times[1:]) // 2]
        run.report["handoff"] = {"transport": "cuda_ipc" if run.dev.type == "cuda" else "cpu_shared_memory",
                                 "tensors": len(state), "buckets": len(layout), "gbytes": nbytes / 1e9,
                                 "first_s": times[0], "warm_s": warm,
                                 "warm_publish_s": sorted(publish[1:])[len(publish[1:]) // 2],
                                 "warm_gbytes_per_s": nbytes / 1e9 / warm}
        print(f"  handoff {nbytes / 1e9:.2f} GB in {len(state)} tensors, {len(layout)} buckets: first "
              f"{times[0]:.3f} s, then {warm:.3f} s (publish {run.report['handoff']['warm_publish_s']:.3f} s)",
              flush=True)
    finally:
        q_in.put(None)
        child.join(timeout=30)
    run.save()


def measure_learner(run: Run, bb, args) -> None:
    """One flowbp_sparse (K = args.k) learner step on the LoRA backbone, as gpu_step.py measures it."""
    from flowbp_core import methods

    if not run.fits("learner flowbp_sparse", 20.0 if args.smoke else 90.0):
        return
    reward = gpu_step.ViTReward(gpu_step.vit_config(args.smoke)).to(run.dev, bb.dtype).eval()
    reward.requires_grad_(False)
    bb.enable_gradient_checkpointing()
    n, prompts = args.learner_steps, ["benchmark prompt 0"]
    cond, sched = bb.encode_prompts(prompts), bb.schedule(args.learner_steps)
    velocity = bb.bind(cond)
    noise = torch.randn(bb.latent_shape(1), generator=torch.Generator().manual_seed(0)).to(run.dev, bb.dtype)
    method = methods.build("flowbp_sparse", backbone=bb.preset.method_preset, k=args.k)
    step = gpu_step.reward_step(method, bb, reward, velocity=velocity, noise=noise, sigmas=sched.sigmas, cond=cond,
                                prompts=prompts, n=n)
    s, peak = run.meter.run(step, warm=1, reps=1)
    for p in bb.trainable_parameters():
        p.grad = None
    row = {"method": "flowbp_sparse", "k": args.k, "steps": n, "batch": 1, "seconds": s}
    if peak is not None:
        row["peak_gib"] = peak
    run.report["learner"] = row
    print(f"  learner flowbp_sparse K={args.k}: {s:.3f} s", flush=True)
    run.save()


def targets(rep: dict) -> dict:
    """The issue's two rollout targets from the measured rows (absent until both sides are measured)."""
    ms = {(r["variant"], r["compiled"], r["batch"]): r["ms_per_sample_step"] for r in rep["rollout"]}
    out: dict = {}
    limit = rep.get("limit_ms_per_sample_step")
    top = max(BATCHES)
    if limit and ("merged", True, top) in ms:
        ratio = ms[("merged", True, top)] / limit
        out["compiled_merged_b16_over_limit"] = {"ratio": ratio, "target": 1.3, "met": ratio <= 1.3}
    pairs = {f"{'compiled' if c else 'eager'}_b{b}": ms[("merged", c, b)] / ms[("plain", c, b)]
             for (v, c, b) in ms if v == "merged" and ("plain", c, b) in ms}
    if pairs:
        worst = max(pairs.values())
        out["merged_over_plain"] = {"ratios": pairs, "max": worst, "target": 1.05, "met": worst <= 1.05}
    unmerged = {f"{'compiled' if c else 'eager'}_b{b}": ms[("unmerged", c, b)] / ms[("merged", c, b)]
                for (v, c, b) in ms if v == "unmerged" and ("merged", c, b) in ms}
    if unmerged:
        out["unmerged_over_merged"] = unmerged
    return out


def peak_tflops(device_name: str) -> tuple[str, float]:
    for card, tf in BF16_DENSE_PEAK_TFLOPS.items():
        if card in device_name.upper():
            return card, tf
    return "default (H100)", DEFAULT_PEAK_TFLOPS


def measure_flops(run: Run, bb, cfg: dict) -> None:
    """The docstring's count at this run's token counts, the hooked linear count and the limit per step."""
    cond = bb.encode_prompts(["benchmark prompt 0"])
    states, pooled = cond["prompt_embeds"][:1].to(run.dev, bb.dtype), cond["pooled"][:1].to(run.dev, bb.dtype)
    _, _, h, w = bb.latent_shape(1)
    n_img, n_txt = (h // cfg["patch_size"]) * (w // cfg["patch_size"]), states.shape[1]
    x = torch.zeros(bb.latent_shape(1), device=run.dev, dtype=bb.dtype)
    flops = transformer_flops(cfg, n_img, n_txt)
    flops["linear_hooked_per_row"] = hooked_linear_flops(bb.transformer,
                                                         lambda: bb._forward(x, 0.5, states, pooled, None))
    flops["formula_over_hooked"] = flops["linear_per_row"] / flops["linear_hooked_per_row"]
    card, tf = peak_tflops(run.report["device"])
    run.report.update(tokens={"image": n_img, "text": n_txt}, flops=flops, peak_card=card, peak_tflops=tf,
                      limit_ms_per_sample_step=1e3 * flops["per_sample_step"] / (tf * 1e12))
    print(f"  {flops['per_row'] / 1e12:.3f} TFLOP a row ({n_img} + {n_txt} tokens); formula / hooked linear "
          f"{flops['formula_over_hooked']:.4f}; limit {run.report['limit_ms_per_sample_step']:.3f} ms per "
          f"sample-step at {tf} TFLOP/s", flush=True)


def measure(run: Run, args) -> None:
    from flowbp_core.backbones import LoRAConfig
    from flowbp_core.backbones import sd3 as fam
    from flowbp_core.sampling import compile_for_sampling

    dtype = torch.bfloat16 if run.dev.type == "cuda" else torch.float32
    cfg = fam.TINY_TRANSFORMER if args.smoke else fam.REAL_TRANSFORMER
    lora = LoRAConfig(rank=args.lora_rank)
    bb = gpu_step.build_backbone("sd3", args.smoke, run.dev, dtype, args.res)
    run.report["params_b"] = sum(p.numel() for p in bb.transformer.parameters()) / 1e9
    measure_flops(run, bb, cfg)
    for b in BATCHES:
        rollout_ms(run, bb, b, "plain", False)
    merged = bb.merged_lora(lora)
    delta, zero = random_lora_state(merged, 1), zero_lora_state(merged)
    run.report["merge_ms"] = 1e3 * run.meter.run(lambda: merged.load(delta), warm=1, reps=3)[0]
    for b in BATCHES:
        rollout_ms(run, bb, b, "merged", False)
    measure_handoff(run, {n: p.detach() for n, p in bb.transformer.named_parameters()})

    ad = gpu_step.build_backbone("sd3", args.smoke, run.dev, dtype, args.res)
    ad.apply_lora(lora)
    for b in BATCHES:
        rollout_ms(run, ad, b, "unmerged", False)

    backend = "eager" if args.smoke else "inductor"  # smoke: trace only, no kernel generation
    compile_for_sampling(bb.transformer, cuda_graphs=True, backend=backend)  # as compile_rollout does
    run.report["compile_backend"] = backend
    order = [(max(BATCHES), "merged"), (max(BATCHES), "plain"), ("learner", None), ("unmerged", None)]
    order += [(b, v) for b in sorted(BATCHES, reverse=True)[1:] for v in ("merged", "plain")]
    for b, variant in order:
        if b == "learner":
            measure_learner(run, ad, args)
        elif b == "unmerged":
            ad.disable_gradient_checkpointing()  # the rollout runs no-grad; compile the plain forward
            compile_for_sampling(ad.transformer, cuda_graphs=True, backend=backend)
            rollout_ms(run, ad, max(BATCHES), "unmerged", True)
        else:
            merged.load(delta if variant == "merged" else zero)  # zero delta: W0 back exactly, no recompile
            rollout_ms(run, bb, b, variant, True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny config on the CPU; checks the script, not costs")
    ap.add_argument("--res", type=int, default=None, help="image side in pixels (512; smoke: 32)")
    ap.add_argument("--steps", type=int, default=8, help="rollout steps timed per measurement (cost is per step)")
    ap.add_argument("--learner-steps", type=int, default=25, help="N of the learner step")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--handoff-reps", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=540.0, help="skip what does not fit in this many seconds")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    args.res = args.res or (32 if args.smoke else 512)
    if args.smoke:  # tiny and quick: the smoke run checks the script, the step counts do not change its paths
        args.steps, args.learner_steps = min(args.steps, 3), min(args.learner_steps, 6)
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("NO CUDA DEVICE AVAILABLE: the real-size benchmark needs a GPU; --smoke checks this script on the "
              "CPU.", flush=True)
        return 2
    if cuda:
        torch.backends.cuda.enable_cudnn_sdp(False)  # cuDNN attention failed on these shapes (h100-anchor.md)
    else:
        print("NO CUDA DEVICE AVAILABLE: smoke run on the CPU; these times are not GPU numbers.", flush=True)
    dev = torch.device("cuda" if cuda else "cpu")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    run = Run(args, dev, out_dir / f"gpu_rollout_{gpu_step.card_slug(dev, args.smoke)}.json")
    run.report.update(device=torch.cuda.get_device_name() if cuda else "cpu", cuda=cuda, smoke=args.smoke,
                      torch=torch.__version__, resolution=args.res, lora_rank=args.lora_rank)
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    if not cuda:
        torch.set_num_threads(1)  # tiny models: threading overhead exceeds the work
    try:
        measure(run, args)
    except torch.OutOfMemoryError as e:
        run.report["skipped"].append({"item": "rest of the run", "reason": f"out of memory: {str(e)[:200]}"})
    finally:
        torch.set_num_threads(threads)
    run.save()
    print("targets:", json.dumps(run.report["targets"], indent=1))
    print(f"wrote {run.out} in {run.report['elapsed_s']:.1f} s; skipped: {len(run.report['skipped'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
