"""Pipeline benchmark: samples/s of the Ray runtime with 1 and 2 rollout workers, each phase's time, object-store
transfer per cache, and pipeline efficiency = achieved samples/s / rate of the slowest stage measured alone.

    .venv/bin/python benchmarks/pipeline.py            # tiny SD3 on CPU, local Ray on loopback
    .venv/bin/python benchmarks/pipeline.py --steps 10 --batch 4 --n-steps 8

The pipeline runs in `async` mode (max_staleness 1, queue depth 2) so rollout and learning overlap; the stages
alone are: R rollout workers sampling back to back with no learner, and one learner stepping on caches that are
already in the object store. Rates are steady state (the first step, which pays start-up, is left out).
Prints a table and writes benchmarks/results/pipeline.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_cfg(tmp: str, workers: int, a: argparse.Namespace, run_id: str):
    from flowbp_core.config import config_from_dict

    return config_from_dict({
        "run_id": run_id,
        "backbone": {"name": "sd3", "tiny": True, "device": "cpu", "finetune": "lora", "lora": {"rank": 4}},
        "method": {"name": "flowbp_sparse", "k": 2},
        "reward": {"terms": [{"name": "saturation"}], "loss": "neg_mean", "placement": a.placement,
                   "served": {"replicas": 1, "num_cpus": 0.25, "decode_on_reward_side": True}},
        "sampling": {"n_steps": a.n_steps},
        "train": {"steps": a.steps, "batch_size": a.batch, "lr": 1e-3,
                  "prompts": {"prompts": ["a red cube", "a blue ball on grass", "two green cats", "a yellow sign"]}},
        "runtime": {"rollout_workers": workers, "learners": 1, "mode": "async", "max_staleness": 1,
                    "queue_depth": 2, "rollout_num_cpus": 1, "learner_num_cpus": 1},
        "checkpoint": {"dir": tmp, "every": 10_000, "keep": 1},
        "eval": {"every": 0, "limit": 1, "prompts": {"prompts": ["x"]}},
    })


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def steady_rate(events: list[dict], batch: int) -> tuple[float, float]:
    """(samples/s, seconds per step) from the median interval between consecutive learner steps. Medians, here
    and for the stages alone, because this machine's 2 cores are shared and single intervals are noisy."""
    t = [e["t"] for e in events if e["event"] == "step" and not e["skipped"]]
    if len(t) < 3:
        raise RuntimeError("need at least 3 steps for a steady-state rate")
    per_step = median([b - a for a, b in zip(t[1:], t[2:])])  # the first interval still pays start-up
    return batch / per_step, per_step


def rollout_alone(cfg, workers: int, steps: int) -> float:
    """Samples/s of `workers` rollout actors sampling back to back (no learner), after one warm-up step."""
    import ray

    from flowbp_core.run import build_method, load_prompts
    from flowbp_core.step import step_plan
    from flowbp_core.training import PromptSampler
    from services.runtime import rollout
    from services.runtime.layout import shard_bounds
    from services.runtime.payloads import RolloutRequest

    ws = rollout.spawn(cfg, workers)
    sampler = PromptSampler(load_prompts(cfg.train.prompts), cfg.train.batch_size, cfg.train.seed)
    method = build_method(cfg)

    def one(step):
        p = sampler.batch(step)
        plan = step_plan(method, cfg.sampling.n_steps, 0, step)
        refs = []
        for w, (a, b) in zip(ws, shard_bounds(len(p), len(ws))):
            req = RolloutRequest(step=step, seed=0, prompts=tuple(p[a:b]), weights=None, total_batch=len(p), plan=plan)
            _, s = w.rollout.remote(req, a)
            refs.append(s)
        return refs

    ray.get(one(0))
    times = []
    for s in range(1, steps + 1):  # one step at a time, its shards in parallel: the rollout stage's step time
        t0 = time.perf_counter()
        ray.get(one(s))
        times.append(time.perf_counter() - t0)
    for w in ws:
        ray.kill(w)
    return cfg.train.batch_size / median(times)


def learner_alone(cfg, steps: int) -> tuple[float, int]:
    """(samples/s, bytes per cache) of one learner (same resources as in the pipeline) on caches already in the
    object store."""
    import ray

    from services.runtime.learner import LearnerRank
    from services.runtime.rollout import RolloutCore
    from services.runtime.payloads import LearnerWork, RolloutRequest
    from flowbp_core.run import load_prompts
    from flowbp_core.step import step_plan
    from flowbp_core.training import PromptSampler

    @ray.remote(num_cpus=cfg.runtime.learner_num_cpus)
    class Bench:
        def __init__(self, cfg_json):
            import torch

            from flowbp_core.config import RunConfig

            torch.set_num_threads(1)
            self.learner = LearnerRank(RunConfig.model_validate_json(cfg_json), "bench-learner")

        def run(self, works):
            times = []
            for i, w in enumerate(works):
                t0 = time.perf_counter()
                self.learner.train(i, self.learner.fetch(w)[0])
                times.append(time.perf_counter() - t0)
            return times

    core = RolloutCore(cfg)
    sampler = PromptSampler(load_prompts(cfg.train.prompts), cfg.train.batch_size, cfg.train.seed)
    works = []
    for s in range(steps + 1):
        p = sampler.batch(s)
        plan = step_plan(core.comp.method, cfg.sampling.n_steps, 0, s)
        req = RolloutRequest(step=s, seed=0, prompts=tuple(p), weights=None, total_batch=len(p), plan=plan)
        (blob,), _ = core.run(req)
        works.append(LearnerWork(step=s, rank_refs=((ray.put(blob),),), rollout_policy_version=0))
    cache_bytes = blob.nbytes
    b = Bench.remote(cfg.model_dump_json())
    times = ray.get(b.run.remote(works))[1:]
    ray.kill(b)
    return cfg.train.batch_size / median(times), cache_bytes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--n-steps", type=int, default=12, help="rollout Euler steps N")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--placement", choices=["colocated", "served"], default="colocated")
    p.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray")
    p.add_argument("--out", default=str(REPO / "benchmarks/results/pipeline.json"))
    a = p.parse_args()
    import ray

    from services.localproc import init_local_ray
    from services.runtime.driver import Driver

    init_local_ray(num_cpus=a.num_cpus, object_store_mb=256, log_to_driver=False)
    rows = []
    try:
        for r in a.workers:
            tmp = tempfile.mkdtemp(prefix="flowbp-bench-")
            cfg = make_cfg(tmp, r, a, f"bench-r{r}")
            drv = Driver(cfg)
            s = drv.run()
            events = [json.loads(x) for x in (drv.run_dir / "events.jsonl").read_text().splitlines()]
            sps, step_s = steady_rate(events, a.batch)
            nbytes = [e for e in events if e["event"] == "step"]
            ro = rollout_alone(cfg, r, a.steps)
            le, cache_bytes = learner_alone(cfg, a.steps)
            slowest = min(ro, le)
            ph = s.phase_seconds
            rows.append({
                "rollout_workers": r, "cache_bytes": cache_bytes,
                "load_average_1m": os.getloadavg()[0], "samples_per_s": sps, "step_seconds": step_s,
                "rollout_alone_samples_per_s": ro, "learner_alone_samples_per_s": le,
                "slowest_stage": "rollout" if ro < le else "learner", "efficiency": sps / slowest,
                "transfer_seconds_per_cache": ph.get("transfer", 0.0),
                "transfer_share_of_step": ph.get("transfer", 0.0) / step_s,
                "phase_seconds": ph, "status": s.status, "steps": len(nbytes),
            })
    finally:
        ray.shutdown()
    result = {"machine": f"{platform.node()}: {os.cpu_count()} CPU cores (shared), no GPU",
              "config": {"backbone": "sd3 tiny", "method": "flowbp_sparse k=2", "n_steps": a.n_steps,
                         "batch": a.batch, "steps": a.steps, "mode": "async max_staleness=1 queue_depth=2",
                         "reward": f"saturation ({a.placement})"},
              "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))
    hdr = ("workers", "samples/s", "step s", "rollout alone", "learner alone", "efficiency", "cache KiB", "transfer ms",
           "transfer %", "rollout s", "surrogate s", "reward s", "backward s", "sync s")
    print(" | ".join(hdr))
    print(" | ".join("---" for _ in hdr))
    for x in rows:
        ph = x["phase_seconds"]
        print(" | ".join([str(x["rollout_workers"]), f"{x['samples_per_s']:.2f}", f"{x['step_seconds']:.3f}",
                          f"{x['rollout_alone_samples_per_s']:.2f}", f"{x['learner_alone_samples_per_s']:.2f}",
                          f"{x['efficiency']:.2f}", f"{x['cache_bytes'] / 1024:.0f}",
                          f"{1000 * x['transfer_seconds_per_cache']:.1f}",
                          f"{100 * x['transfer_share_of_step']:.1f}"]
                         + [f"{ph.get(k, 0.0):.3f}" for k in ("rollout", "surrogate", "reward", "backward", "sync")]))
    print(f"load average (1 min) at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
