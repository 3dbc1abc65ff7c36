"""Pipeline benchmark: samples/s of the Ray runtime with 1 and 2 rollout workers, each phase's time, object-store
transfer per cache, and pipeline efficiency = achieved samples/s / rate of the slowest stage measured alone.

    .venv/bin/python benchmarks/pipeline.py            # tiny SD3 on CPU, local Ray on loopback
    .venv/bin/python benchmarks/pipeline.py --steps 10 --batch 4 --n-steps 8

The pipeline runs in `async` mode (max_staleness 1, queue depth 2) so rollout and learning overlap; the stages
alone are: R rollout workers sampling back to back with no learner, and one learner stepping on caches that are
already in the object store. Rates are steady state (the first step, which pays start-up, is left out).
Prints a table and writes benchmarks/results/pipeline.json.

    .venv/bin/python benchmarks/pipeline.py --model sd35m   # no Ray run: efficiency at SD3.5-M size from measured
                                                             # stage times and object-store transfers

`--model sd35m` computes (`model_efficiency`, formula in the README) the step time and efficiency of 1 GPU
(colocated) and of R rollout GPUs + 1 learner GPU (async) from the per-sample rollout and learner times of a GPU
JSON (`--stages`, default the newest benchmarks/results/gpu_step_*.json; or `--rollout-s/--learn-s` with
`--stages-source`) and the transfers of `benchmarks/objstore.py` (`--objstore`); with a real-size
`benchmarks/gpu_rollout.py` JSON (`--handoff`, default the newest) it adds rows whose weights go by
`collective` (`collective_inputs`); it writes benchmarks/results/pipeline_sd35m.json, every input with its source.
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
from statistics import median

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


def model_efficiency(*, rollout_s: float, learn_s: float, batch: int, rollout_gpus: int | None,
                     cache_put_s: float, cache_get_s: float, weights_publish_s: float, weights_fetch_s: float) -> dict:
    """Step time and efficiency of one step of `batch` samples. Per-sample inputs: `rollout_s` and `learn_s` (the
    stages alone on one GPU), `cache_put_s` (serialize + put, on the rollout side) and `cache_get_s` (get + read in
    place, on the learner side); per-step inputs: `weights_publish_s` (learner side) and `weights_fetch_s` (rollout
    side). `rollout_gpus=None`: colocated on one GPU, every stage and transfer in series. Else async with R
    rollout GPUs and 1 learner GPU: each transfer sits on its own side's critical path and the sides overlap.
    Efficiency = the slowest stage's compute / the step time."""
    if batch < 1 or (rollout_gpus is not None and rollout_gpus < 1):
        raise ValueError(f"batch={batch}, rollout_gpus={rollout_gpus}: need batch >= 1 and rollout_gpus >= 1 or None")
    transfer = batch * (cache_put_s + cache_get_s) + weights_publish_s + weights_fetch_s
    if rollout_gpus is None:
        compute = batch * (rollout_s + learn_s)
        step = compute + transfer
    else:
        r = rollout_gpus
        compute = max(batch * rollout_s / r, batch * learn_s)
        step = max(batch * (rollout_s + cache_put_s) / r + weights_fetch_s,
                   batch * (learn_s + cache_get_s) + weights_publish_s)
    return {"rollout_gpus": rollout_gpus, "mode": "colocated" if rollout_gpus is None else "async",
            "step_s": step, "compute_s": compute, "efficiency": compute / step,
            "transfer_s": transfer, "transfer_share_of_step": transfer / step,
            "transfer_not_overlapped_s": step - compute,
            "samples_per_s": batch / step}


def stage_inputs(a: argparse.Namespace) -> dict:
    """Per-sample rollout and learner seconds, each {value, kind, source}: from a gpu_step JSON (the learner alone
    is its flowbp_sparse step less its rollout), or from the flags."""
    if a.rollout_s is not None or a.learn_s is not None:
        if a.rollout_s is None or a.learn_s is None or not a.stages_source:
            raise SystemExit("--rollout-s, --learn-s and --stages-source go together")
        return {k: {"value": v, "kind": "cited", "source": a.stages_source}
                for k, v in (("rollout_s", a.rollout_s), ("learn_s", a.learn_s))}
    paths = [Path(a.stages)] if a.stages else sorted((REPO / "benchmarks/results").glob("gpu_step_*.json"))
    for path in paths:  # the first with ok sd3 rollout and flowbp_sparse rows in this fine-tuning mode
        d = json.loads(path.read_text())
        rows = {r["item"]: r for r in d["rows"] if r["backbone"] == "sd3" and r["mode"] == a.finetune
                and r["status"] == "ok"}
        if {"rollout", "flowbp_sparse"} <= set(rows):
            break
    else:
        raise SystemExit(f"no ok sd3 {a.finetune} rollout and flowbp_sparse rows in {[str(p) for p in paths]}: "
                         "pass --stages or --rollout-s/--learn-s/--stages-source")
    per = d["batch"]
    src = (f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path}: {d['device']}, {d['resolution']} px, "
           f"N={d['n_steps']}, batch {per}, {a.finetune}")
    ro, step = rows["rollout"]["seconds"], rows["flowbp_sparse"]["seconds"]
    return {"rollout_s": {"value": ro / per, "kind": "measured", "source": f"{src}: rollout row"},
            "learn_s": {"value": (step - ro) / per, "kind": "measured",
                        "source": f"{src}: flowbp_sparse (K={rows['flowbp_sparse']['k']}) less rollout"}}


def transfer_inputs(path: Path, px: int) -> dict:
    """Per-sample cache put/get and per-step weight publish/fetch seconds from benchmarks/objstore.py's JSON."""
    d = json.loads(path.read_text())
    c = next((c for c in d["cache"] if c["px"] == px), None)
    if c is None:
        raise SystemExit(f"{path}: no cache row at {px} px")
    w = d["weights"]
    src = f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path}: {d['machine']}, median of {c['reps']}"
    wsrc = src + (f", {w['fraction_sent']:.2f} of the state sent, scaled linearly" if w["scaled_linearly"] else "")
    return {"cache_put_s": {"value": (c["serialize_s"] + c["put_s"]) / c["batch"], "kind": "measured", "source": src},
            "cache_get_s": {"value": (c["get_s"] + c["view_s"]) / c["batch"], "kind": "measured", "source": src},
            "weights_publish_s": {"value": w["publish_s"], "kind": "measured", "source": wsrc},
            "weights_fetch_s": {"value": w["fetch_s"], "kind": "measured", "source": wsrc}}


def collective_inputs(path: Path, interconnect_gbps: float) -> dict:
    """Per-step weight publish/fetch seconds of `runtime.weight_sync: collective` from a gpu_rollout JSON's
    same-GPU handoff (the runtime's own pack, share and map): on one GPU the reader maps rank 0's buckets
    (publish = pack + share, fetch = the rest of the handoff: map, copy out, load); across GPUs the same pack,
    then a broadcast of the state's bytes at `interconnect_gbps` GB/s (stated, not measured: NCCL needs a GPU a
    rank) plus the same copy out and load."""
    d = json.loads(path.read_text())
    h = d.get("handoff")
    if not h or d.get("smoke"):
        raise SystemExit(f"{path}: no real-size handoff (a --smoke run, or the handoff was skipped)")
    src = f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path}: {d.get('device', '?')}, {h['transport']}"
    publish, load = h["warm_publish_s"], h["warm_s"] - h["warm_publish_s"]
    wire = h["gbytes"] / interconnect_gbps
    return {"colocated": {"weights_publish_s": {"value": publish, "kind": "measured", "source": f"{src}: publish"},
                          "weights_fetch_s": {"value": load, "kind": "measured", "source": f"{src}: map + load"}},
            "separate": {"weights_publish_s": {"value": publish, "kind": "measured", "source": f"{src}: publish"},
                         "weights_fetch_s": {"value": wire + load, "kind": "computed",
                                             "source": f"{h['gbytes']:.2f} GB / {interconnect_gbps:g} GB/s "
                                                       f"(stated) + {src}: map + load"}}}


def newest_handoff() -> Path | None:
    """The newest real-size gpu_rollout JSON under benchmarks/results, if any."""
    paths = sorted((REPO / "benchmarks/results").glob("gpu_rollout_*.json"), key=lambda p: p.stat().st_mtime)
    return next((p for p in reversed(paths) if not json.loads(p.read_text()).get("smoke")), None)


def model_main(a: argparse.Namespace) -> None:
    import yaml

    inputs = {**stage_inputs(a), **transfer_inputs(Path(a.objstore), a.px)}
    vals = {k: v["value"] for k, v in inputs.items()}
    batch = a.model_batch or yaml.safe_load((REPO / "deploy/configs/sd35.yaml").read_text())["train"]["batch_size"]
    gpus = [None, *a.rollout_gpus]
    rows = [{"weights": "object_store", **model_efficiency(**vals, batch=batch, rollout_gpus=r)} for r in gpus]
    handoff = Path(a.handoff) if a.handoff else newest_handoff()
    coll = collective_inputs(handoff, a.interconnect_gbps) if handoff else None
    if coll:
        for r in gpus:
            w = coll["colocated" if r is None else "separate"]
            rows.append({"weights": "collective", **model_efficiency(
                **{**vals, **{k: v["value"] for k, v in w.items()}}, batch=batch, rollout_gpus=r)})
    out = Path(a.out if a.out != str(REPO / "benchmarks/results/pipeline.json")
               else REPO / "benchmarks/results/pipeline_sd35m.json")
    out.write_text(json.dumps({"model": a.model, "px": a.px, "batch": batch, "inputs": inputs,
                               "collective_inputs": coll, "rows": rows}, indent=2))
    for k, v in [*inputs.items(), *(((f"collective {g} {k}", v) for g, w in coll.items() for k, v in w.items())
                                   if coll else ())]:
        print(f"{k} = {v['value']:.4g} s ({v['kind']}: {v['source']})")
    if not coll:
        print("collective rows: none (no real-size benchmarks/results/gpu_rollout_*.json; pass --handoff)")
    print("| GPUs | mode | weights | step s | transfer s | transfer % | not overlapped s | efficiency |")
    print("|---|---|---|---|---|---|---|---|")
    for x in rows:
        g = "1 (shared)" if x["rollout_gpus"] is None else f"{x['rollout_gpus']} + 1"
        print(f"| {g} | {x['mode']} | {x['weights']} | {x['step_s']:.2f} | {x['transfer_s']:.2f} | "
              f"{100 * x['transfer_share_of_step']:.1f} | {x['transfer_not_overlapped_s']:.2f} | "
              f"{x['efficiency']:.3f} |")
    print(f"wrote {out}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--n-steps", type=int, default=12, help="rollout Euler steps N")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--placement", choices=["colocated", "served"], default="colocated")
    p.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray")
    p.add_argument("--out", default=str(REPO / "benchmarks/results/pipeline.json"))
    p.add_argument("--model", choices=["sd35m"], help="no Ray run: efficiency at this model's size (see above)")
    p.add_argument("--model-batch", type=int, help="--model: samples per step (default: deploy/configs/sd35.yaml's)")
    p.add_argument("--px", type=int, default=512, help="--model: the resolution of the cache transfer")
    p.add_argument("--finetune", choices=["full", "lora"], default="full", help="--model: the gpu_step rows used")
    p.add_argument("--rollout-gpus", type=int, nargs="+", default=[1, 2, 4, 8], help="--model: R of R + 1 GPUs")
    p.add_argument("--stages", help="--model: a gpu_step JSON (default: the newest under benchmarks/results)")
    p.add_argument("--rollout-s", type=float, help="--model: rollout seconds per sample, instead of --stages")
    p.add_argument("--learn-s", type=float, help="--model: learner seconds per sample, instead of --stages")
    p.add_argument("--stages-source", help="--model: where --rollout-s/--learn-s come from")
    p.add_argument("--objstore", default=str(REPO / "benchmarks/results/objstore.json"), help="--model: transfers")
    p.add_argument("--handoff", help="--model: a real-size gpu_rollout JSON whose same-GPU handoff gives the "
                   "collective rows (default: the newest under benchmarks/results, if any)")
    p.add_argument("--interconnect-gbps", type=float, default=50.0, help="--model: GB/s a collective broadcast "
                   "reaches between GPUs (default 50: one 400 Gb/s NIC between nodes)")
    a = p.parse_args()
    if a.model:
        return model_main(a)
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
