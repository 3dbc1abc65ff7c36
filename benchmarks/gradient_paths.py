"""Gradient paths of every method: memory, time, and agreement with the exact gradient, on two models.

tiny      the tiny SD3 model (2 layers + VAE, random weights, 32 px), true CFG 3.5, N in {10, 25, 50}. Each method
          re-forwards with its own guidance (`method.guidance`: the chained methods attach the negative branch, the
          others detach it as they train). One cached rollout, then for P sampled plans: endpoint -> VAE decode ->
          reward -> backward, measuring
            saved_bytes   bytes autograd saves for backward in the endpoint (activations; parameters excluded; the
                          decode + reward graph is the same for every method and left out). Max over plans.
            ms/sample     process CPU time of endpoint + decode + reward + backward per sample (1 torch thread; min of
                          two identical runs per plan, since the CPU is shared), median over plans.
            cosine        cos(grad_method, grad_exact), mean over plans; grad_exact = backprop through the full
                          Euler chain of the guided velocity, both CFG branches attached (full_bptt).
            inflation     |grad_method| / |grad_exact|, mean over plans (sample weights 1: only the path compared).
          The reward is a fixed random linear functional of the decoded image.
embedded  the committed embedded base (`backbones.build("embedded")`, trained weights), full fine-tuning, true
          CFG 4 with both branches attached for every method and the exact gradient, N = 10, the world reward
          (`world_attributes`) with the neg-mean loss, `--embedded-batches` batches of 4 held-out prompts (own
          noise seed each) x `--embedded-plans` plans: cosine to the exact gradient (mean, seed spread = standard
          deviation over batches x plans, min) and norm inflation (norm / exact norm).
before    for the methods whose gradient issue 13 changed (DRTune, DRaFT-K, AlignProp, full BPTT under guidance):
          the cosine between the gradient as computed now and as computed before (chained methods: negative CFG
          branch detached; AlignProp: a contiguous tail of K ~ U{1..N} steps; DRTune: train-step start uniform in
          [0, stride)). Same plan where the plan did not change, else the plan-averaged gradients.

  .venv/bin/python benchmarks/gradient_paths.py [--models tiny,embedded] [--plans 6] [--batch 2]
      [--embedded-batches 3] [--embedded-plans 2] [--out benchmarks/results/gradient_paths.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flowbp_core import methods  # noqa: E402
from flowbp_core.guidance import GuidanceConfig  # noqa: E402
from flowbp_core.methods import posterior  # noqa: E402
from flowbp_core.methods.memory import saved_tensor_bytes  # noqa: E402
from flowbp_core.sampling import rollout  # noqa: E402

NS = (10, 25, 50)
ROWS = [
    ("flowbp_sparse", {}),
    ("flowbp_bridge", {}),
    ("flowbp_lagrange", {}),
    ("leapalign", {}),
    ("refl", {}),
    ("drtune", {}),
    ("draft_lv", {}),
    ("draft_k", {"k": 1}),
    ("draft_k", {"k": 4}),
    ("alignprop", {}),
    ("alignprop", {"truncation": "tail", "random_k": True}),
    ("full_bptt", {}),
    ("full_bptt", {"checkpoint": False}),
]
CHANGED = [("drtune", {}), ("draft_k", {"k": 1}), ("draft_k", {"k": 4}), ("alignprop", {}), ("full_bptt", {})]
EMBEDDED_N = 10
EMBEDDED_CFG = 4.0


def label(name: str, kw: dict) -> str:
    return name + ("" if not kw else "[" + ",".join(f"{k}={v}" for k, v in kw.items()) + "]")


def flat_grad(params) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.dot(a, b)) / max(float(a.norm()) * float(b.norm()), 1e-30)


# ---- the gradient as computed before issue 13 (for the "before" comparison) ---------------------------------------
def _before_evenly_spaced(last: int, k: int, generator: torch.Generator) -> list[int]:
    """DRTune's train steps before issue 13: the start uniform in [0, stride) instead of the reference's range."""
    stride = (last + 1) // k
    start = int(torch.randint(0, stride, (1,), generator=generator))
    return [start + m * stride for m in range(k)]


def before_plan(name: str, kw: dict, n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    if name == "drtune":
        with mock.patch.object(posterior, "evenly_spaced", _before_evenly_spaced):
            return methods.build(name, **kw).plan(n, gen)
    if name == "alignprop":
        return methods.build("alignprop", truncation="tail", random_k=True).plan(n, gen)
    return methods.build(name, **kw).plan(n, gen)


def before_guidance(name: str, guidance: GuidanceConfig) -> GuidanceConfig:
    chained = name in ("draft_k", "alignprop", "full_bptt")
    return dataclasses.replace(guidance, detach_negative=True) if chained else guidance


# ---- one gradient ----------------------------------------------------------------------------------------------
class Grader:
    """Gradient of loss(reward(decode(endpoint))) w.r.t. the trainable weights, with bytes and CPU time."""

    def __init__(self, bb, cache, prompts, loss_of_value):
        self.bb, self.cache, self.prompts, self.loss_of_value = bb, cache, prompts, loss_of_value
        self.params = bb.trainable_parameters()

    def grad(self, method, guidance: GuidanceConfig, plan):
        for p in self.params:
            p.grad = None
        velocity = self.bb.bind(self.cache.cond, guidance)
        # process CPU time, not wall time: the machine is shared and wall time mostly measures the neighbours
        t0 = time.process_time()
        cache = self.cache.with_plan(plan)
        nbytes, ep = saved_tensor_bytes(lambda: method.endpoint(cache, velocity), exclude=self.params)
        self.loss_of_value(ep.value, [self.prompts[int(i)] for i in ep.sample_index]).backward()
        return flat_grad(self.params), nbytes, time.process_time() - t0, ep


def exact_grad(grader: Grader, guidance: GuidanceConfig) -> torch.Tensor:
    m = methods.build("full_bptt", checkpoint=False)  # its plan (every step) draws nothing from the generator
    return grader.grad(m, m.guidance(guidance), m.plan(grader.cache.n_steps, torch.Generator().manual_seed(0)))[0]


def before_vs_now(grader: Grader, preset: str | None, guidance: GuidanceConfig, n: int, seeds: list[int],
                  attach_all: bool) -> dict[str, float]:
    """cos(now, before) per changed method: per plan where the plan is unchanged, else of the plan means."""
    out = {}
    for name, kw in CHANGED:
        m = methods.build(name, backbone=preset, **kw)
        g_now = guidance if attach_all else m.guidance(guidance)
        g_before = before_guidance(name, guidance)
        same_plan = name in ("draft_k", "full_bptt")
        cut = seeds[:1] if name == "full_bptt" else seeds
        now = [grader.grad(m, g_now, m.plan(n, torch.Generator().manual_seed(s)))[0] for s in cut]
        before = [grader.grad(m, g_before, before_plan(name, kw, n, s))[0] for s in cut]
        if same_plan:
            out[label(name, kw)] = statistics.mean(cosine(a, b) for a, b in zip(now, before))
        else:
            out[label(name, kw)] = cosine(torch.stack(now).mean(0), torch.stack(before).mean(0))
    return out


# ---- tiny random-weight SD3 --------------------------------------------------------------------------------------
def run_tiny(args) -> dict:
    from flowbp_core.backbones import build

    torch.manual_seed(args.seed)
    bb = build("sd3", tiny=True, seed=args.seed)
    base = bb.preset.guidance
    prompts = [f"a photo of object {i}" for i in range(args.batch)]
    cond = bb.encode_prompts(prompts)
    noise = torch.randn(bb.latent_shape(args.batch), generator=torch.Generator().manual_seed(args.seed))
    proj = torch.randn(bb.decode(noise[:1]).shape[1:], generator=torch.Generator().manual_seed(args.seed + 1))

    def loss(value: torch.Tensor, _prompts: list[str]) -> torch.Tensor:
        return -(bb.decode(value) * proj).flatten(1).mean(1).mean()

    results, before = [], {}
    seeds = [1000 + s for s in range(args.plans)]
    for n in NS:
        cache = rollout(bb.bind(cond, base), noise, bb.schedule(n).sigmas, seed=args.seed, cond=cond, prompts=prompts)
        grader = Grader(bb, cache, prompts, loss)
        exact = exact_grad(grader, base)
        en = float(exact.norm())
        for name, kw in ROWS:
            m = methods.build(name, backbone="sd35", **kw)
            g_m = m.guidance(base)
            cos, infl, times, sizes, jac = [], [], [], [], []
            for s in seeds[:1] if name == "full_bptt" else seeds:
                plan = m.plan(n, torch.Generator().manual_seed(s))
                g, nbytes, dt, ep = grader.grad(m, g_m, plan)
                dt = min(dt, grader.grad(m, g_m, plan)[2])  # the faster of two identical runs
                cos.append(cosine(g, exact))
                infl.append(float(g.norm()) / en)
                times.append(dt / args.batch)
                sizes.append(nbytes)
                jac.append(ep.diagnostics.jacobian_factors)
            results.append(dict(method=label(name, kw), n_steps=n, plans=len(cos), saved_bytes=max(sizes),
                                ms_per_sample=1000 * statistics.median(times), cosine=statistics.mean(cos),
                                cosine_min=min(cos), inflation=statistics.mean(infl), inflation_max=max(infl),
                                jacobian_factors_max=max(jac), exact_grad_norm=en))
            r = results[-1]
            print(f"  tiny {r['method']:<34} N={n:<3} bytes={r['saved_bytes']:>10,} ms={r['ms_per_sample']:7.1f} "
                  f"cos={r['cosine']:+.3f} infl={r['inflation']:.3f}", flush=True)
        before[n] = before_vs_now(grader, "sd35", base, n, seeds, attach_all=False)
        print(f"  tiny N={n} cos(now, before): " + ", ".join(f"{k} {v:+.3f}" for k, v in before[n].items()),
              flush=True)
    return dict(model="tiny SD3 (SD3Transformer2DModel 2 layers + AutoencoderKL, random weights, 32 px)",
                guidance=dataclasses.asdict(base), batch=args.batch, plans=args.plans,
                reward="fixed random linear functional of the decoded image", results=results,
                cosine_to_before=before)


# ---- the committed embedded base --------------------------------------------------------------------------------
def run_embedded(args) -> dict:
    from flowbp_core import rewards
    from flowbp_core.backbones import build
    from flowbp_core.world.data import heldout_prompts

    bb = build("embedded")
    bb.enable_full_finetune()
    reward = rewards.build("world_attributes")
    guidance = GuidanceConfig("true", EMBEDDED_CFG, detach_negative=False)
    texts = [it.text for it in heldout_prompts()]
    rows: dict[str, dict[str, list[float]]] = {label(n, kw): {"cos": [], "infl": []} for n, kw in ROWS[:-1]}
    before: dict[str, list[float]] = {}
    exact_norms = []
    for b in range(args.embedded_batches):
        prompts = texts[b * 4 * 7 % len(texts):][:4]  # spread over the held-out set
        cond = bb.encode_prompts(prompts)
        noise = torch.randn(bb.latent_shape(len(prompts)), generator=torch.Generator().manual_seed(100 + b))
        cache = rollout(bb.bind(cond, guidance), noise, bb.schedule(EMBEDDED_N).sigmas, seed=100 + b, cond=cond,
                        prompts=prompts)

        def loss(value: torch.Tensor, rows: list[str]) -> torch.Tensor:
            return -reward(bb.decode(value), rows).mean()

        grader = Grader(bb, cache, prompts, loss)
        exact = exact_grad(grader, guidance)
        en = float(exact.norm())
        exact_norms.append(en)
        seeds = [2000 + 10 * b + s for s in range(args.embedded_plans)]
        for name, kw in ROWS[:-1]:
            m = methods.build(name, backbone="sd35", **kw)
            for s in seeds[:1] if name == "full_bptt" else seeds:
                g = grader.grad(m, guidance, m.plan(EMBEDDED_N, torch.Generator().manual_seed(s)))[0]
                rows[label(name, kw)]["cos"].append(cosine(g, exact))
                rows[label(name, kw)]["infl"].append(float(g.norm()) / en)
        for k, v in before_vs_now(grader, "sd35", guidance, EMBEDDED_N, seeds, attach_all=True).items():
            before.setdefault(k, []).append(v)
        print(f"  embedded batch {b}: {prompts} |exact|={en:.3g}", flush=True)
    results = []
    for lab, d in rows.items():
        c, i = d["cos"], d["infl"]
        results.append(dict(method=lab, samples=len(c), cosine=statistics.mean(c),
                            cosine_sd=statistics.pstdev(c), cosine_min=min(c), inflation=statistics.mean(i),
                            inflation_max=max(i)))
        r = results[-1]
        print(f"  embedded {lab:<34} cos={r['cosine']:+.3f} sd={r['cosine_sd']:.3f} min={r['cosine_min']:+.3f} "
              f"infl={r['inflation']:.3f}", flush=True)
    return dict(model="committed embedded base (build('embedded'), trained weights), full fine-tuning",
                guidance=dataclasses.asdict(guidance), n_steps=EMBEDDED_N, batches=args.embedded_batches,
                batch=4, plans=args.embedded_plans, reward="world_attributes, loss -mean(r)",
                exact_grad_norms=exact_norms, results=results,
                cosine_to_before={k: statistics.mean(v) for k, v in before.items()})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="tiny,embedded")
    ap.add_argument("--plans", type=int, default=6)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--embedded-batches", type=int, default=3)
    ap.add_argument("--embedded-plans", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/gradient_paths.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    out = dict(machine=f"{platform.machine()} CPU, {torch.get_num_threads()} torch thread(s); {platform.platform()}",
               torch=torch.__version__)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if "tiny" in models:
        out["tiny"] = run_tiny(args)
    if "embedded" in models:
        out["embedded"] = run_embedded(args)
    out["wall_seconds"] = time.time() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out} ({out['wall_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
