"""Gradient paths of every method on the tiny SD3 model: memory, time, and agreement with the exact gradient.

For each method and N in {10, 25, 50}: one cached rollout (true CFG 3.5, negative branch detached), then for P
sampled plans: the learner step endpoint -> VAE decode -> reward -> backward, measuring
  saved_bytes   bytes autograd saves for backward in the endpoint (activations; parameters excluded; the
                decode + reward graph is the same for every method and left out). Max over plans. The chained
                references checkpoint every step (they save each step's input and recompute one step's
                activations during backward); `full_bptt[checkpoint=False]` shows the chain without it.
  ms/sample     process CPU time of endpoint + decode + reward + backward per sample (1 torch thread; min of
                two identical runs per plan, since the CPU is shared), median over plans.
  cosine        cos(grad_method, grad_exact), mean over plans; grad_exact = backprop through the full Euler
                chain (full_bptt), the gradient of the same reward at the same true sample.
  inflation     |grad_method| / |grad_exact|, mean over plans (sample weights set to 1 so that only the
                gradient path is compared).
The reward is a fixed random linear functional of the decoded image, so its gradient is well defined and cheap.

  .venv/bin/python benchmarks/gradient_paths.py [--plans 6] [--batch 2] [--out benchmarks/results/gradient_paths.json]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flowbp_core import methods  # noqa: E402
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
    ("full_bptt", {}),
    ("full_bptt", {"checkpoint": False}),
]


def label(name: str, kw: dict) -> str:
    return name + ("" if not kw else "[" + ",".join(f"{k}={v}" for k, v in kw.items()) + "]")


def build_backbone(seed: int):
    from flowbp_core.backbones import build

    bb = build("sd3", tiny=True, seed=seed)
    return bb, "tiny SD3 (SD3Transformer2DModel 2 layers + AutoencoderKL, random weights, 32 px)"


def flat_grad(params) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--plans", type=int, default=6)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/gradient_paths.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)

    bb, model_desc = build_backbone(args.seed)
    params = bb.trainable_parameters()
    prompts = [f"a photo of object {i}" for i in range(args.batch)]
    cond = bb.encode_prompts(prompts)
    velocity = bb.bind(cond)
    shape = bb.latent_shape(args.batch)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed))
    img_shape = bb.decode(noise[:1]).shape[1:]
    proj = torch.randn(img_shape, generator=torch.Generator().manual_seed(args.seed + 1))

    def reward(value: torch.Tensor) -> torch.Tensor:
        return (bb.decode(value) * proj).flatten(1).mean(1)

    def grad_of(endpoint_fn):
        for p in params:
            p.grad = None
        # process CPU time, not wall time: the machine is shared and wall time mostly measures the neighbours
        t0 = time.process_time()
        nbytes, ep = saved_tensor_bytes(endpoint_fn, exclude=params)
        loss = -reward(ep.value).mean()
        loss.backward()
        dt = time.process_time() - t0
        return flat_grad(params), nbytes, dt, ep

    results = []
    for n in NS:
        sigmas = bb.schedule(n).sigmas
        cache = rollout(velocity, noise, sigmas, seed=args.seed, cond=cond, prompts=prompts)
        exact, _, _, _ = grad_of(lambda: methods.build("full_bptt", checkpoint=False).endpoint(cache, velocity))
        en = float(exact.norm())
        for name, kw in ROWS:
            m = methods.build(name, backbone="sd35", **kw)
            cos, infl, times, sizes, jac, fwd, d0 = [], [], [], [], [], [], []
            n_plans = 1 if name == "full_bptt" else args.plans
            for s in range(n_plans):
                plan = m.plan(n, torch.Generator().manual_seed(1000 + s))
                g, nbytes, dt, ep = grad_of(lambda: m.endpoint(cache, velocity, plan=plan))
                # time a second identical step and keep the faster one (less noise from cache effects)
                dt = min(dt, grad_of(lambda: m.endpoint(cache, velocity, plan=plan))[2])
                gn = float(g.norm())
                cos.append(float(torch.dot(g, exact)) / max(gn * en, 1e-30))
                infl.append(gn / en)
                times.append(dt / args.batch)
                sizes.append(nbytes)
                jac.append(ep.diagnostics.jacobian_factors)
                fwd.append(ep.diagnostics.extra.get("forwards_with_grad", float("nan")))
                d0.append(float(ep.diagnostics.residual_0.mean()))
            row = dict(
                method=label(name, kw), n_steps=n, plans=n_plans,
                saved_bytes=max(sizes), saved_bytes_min=min(sizes),
                ms_per_sample=1000 * statistics.median(times),
                cosine=statistics.mean(cos), cosine_min=min(cos),
                inflation=statistics.mean(infl), inflation_max=max(infl),
                jacobian_factors_max=max(jac), forwards_with_grad_max=max(fwd),
                residual_0_mean=statistics.mean(d0), exact_grad_norm=en,
            )
            results.append(row)
            print(f"  {row['method']:<18} N={n:<3} bytes={row['saved_bytes']:>10,} "
                  f"ms={row['ms_per_sample']:7.1f} cos={row['cosine']:+.3f} infl={row['inflation']:.3f}", flush=True)

    flat = {}
    for name, kw in ROWS:
        lab = label(name, kw)
        b = [r["saved_bytes"] for r in results if r["method"] == lab]
        flat[lab] = (max(b) - min(b)) / max(min(b), 1)
    out = dict(
        machine=f"{platform.machine()} CPU, {torch.get_num_threads()} torch thread(s); {platform.platform()}",
        torch=torch.__version__, model=model_desc, batch=args.batch, plans=args.plans,
        latent_shape=list(shape), reward="fixed random linear functional of the decoded image",
        results=results, saved_bytes_spread_over_n=flat,
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print()
    print(table(results))
    print()
    print("saved-bytes spread over N (max/min - 1): " + ", ".join(f"{k} {v:.1%}" for k, v in flat.items()))
    print(f"wrote {args.out}")


def table(results) -> str:
    head = "| method | N | saved bytes | CPU ms / sample | cosine to exact | inflation | J factors |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(
            f"| {r['method']} | {r['n_steps']} | {r['saved_bytes']:,} | {r['ms_per_sample']:.1f} | "
            f"{r['cosine']:+.3f} | {r['inflation']:.3f} | {r['jacobian_factors_max']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
