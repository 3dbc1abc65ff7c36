"""Object-store transfers at SD3.5-Medium size through the real Ray runtime (local Ray on loopback, CPU only).

    .venv/bin/python benchmarks/objstore.py                       # 512 and 1024 px caches, weights at 1/4 size
    .venv/bin/python benchmarks/objstore.py --weight-fraction 1   # the full 2.24 B-parameter state (~14 GB RAM)

What is timed, as the runtime does it (median of --reps):
- cache: a rollout actor serializes a real-size `TrajectoryCache` (`layout.real_cache`: SD3.5-M latents, 16
  channels at px/8, bf16, the states and velocities the method's plan keeps, the real text conditioning) and puts it
  (`to_bytes` + `ray.put` of the uint8 array); a learner actor `ray.get`s it (mapped, no copy) and reads it in place
  with `TrajectoryCache.from_buffer`. Times are taken inside the actors.
- weights: `weight_sync` `full_state` (`BucketedSync`): the driver publishes bf16 tensors of the real transformer's
  parameter shapes in `runtime.weight_sync_bucket_mb` buckets through a `WeightServer`, and a rollout actor fetches
  every bucket (`BucketedSync.fetch`, copied out). With --weight-fraction < 1 only the first tensors (name order) up
  to that share of the parameters are sent and the times are scaled to the full state linearly in bytes (the JSON
  says so and keeps the measured ones).
Writes benchmarks/results/objstore.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from statistics import median

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MB = 1e6


def sd35m_cfg(k: int, n_steps: int):
    """deploy/configs/sd35.yaml (SD3.5-M, FlowBP-Sparse, full fine-tuning) with K and N set."""
    import yaml

    from flowbp_core.config import config_from_dict

    d = yaml.safe_load((REPO / "deploy/configs/sd35.yaml").read_text())
    d["method"]["k"] = k
    d["sampling"]["n_steps"] = n_steps
    return config_from_dict(d)


def _actors():
    import numpy as np
    import ray

    @ray.remote(num_cpus=0)
    class Producer:
        def __init__(self, cfg_json: str, px: int, batch: int, states: int, velocities: int):
            from flowbp_core.config import RunConfig
            from services.runtime.layout import real_cache

            self.cache = real_cache(RunConfig.model_validate_json(cfg_json), px, batch, states, velocities, fill=0.5)

        def put(self):
            t0 = time.perf_counter()
            blob = np.frombuffer(self.cache.to_bytes(), np.uint8)
            t1 = time.perf_counter()
            ref = ray.put(blob)
            t2 = time.perf_counter()
            return [ref], t1 - t0, t2 - t1, blob.nbytes

    @ray.remote(num_cpus=0)
    class Reader:
        def get_cache(self, refs) -> tuple[float, float]:
            from flowbp_core.cache import TrajectoryCache

            t0 = time.perf_counter()
            buf = ray.get(refs[0])
            t1 = time.perf_counter()
            cache = TrajectoryCache.from_buffer(buf)
            t2 = time.perf_counter()
            if cache.batch_size < 1:
                raise RuntimeError("empty cache read back")
            return t1 - t0, t2 - t1

        def fetch_weights(self, handle) -> tuple[float, int]:
            from services.runtime import weight_sync

            t0 = time.perf_counter()
            state = weight_sync.build("full_state").fetch(handle)
            return time.perf_counter() - t0, sum(v.numel() * v.element_size() for v in state.values())

    return Producer, Reader


def measure_cache(cfg, px: int, batch: int, reps: int) -> dict:
    """Put (serialize + `ray.put`) and get (`ray.get` + `from_buffer`) of one real-size cache of `batch` samples."""
    import ray

    from services.runtime.layout import kept_latents

    states, vels = kept_latents(cfg)
    Producer, Reader = _actors()
    prod = Producer.remote(cfg.model_dump_json(), px, batch, int(states), int(vels))
    reader = Reader.remote()
    ser, put, get, view = [], [], [], []
    nbytes = 0
    for _ in range(reps + 1):  # the first rep warms both actors and is left out
        refs, s, p, nbytes = ray.get(prod.put.remote())
        g, v = ray.get(reader.get_cache.remote(refs))
        ser.append(s), put.append(p), get.append(g), view.append(v)
        del refs
    ray.kill(prod), ray.kill(reader)
    med = {k: median(x[1:]) for k, x in (("serialize_s", ser), ("put_s", put), ("get_s", get), ("view_s", view))}
    total = sum(med.values())
    return {"px": px, "batch": batch, "kept_states": states, "kept_velocities": vels, "bytes": nbytes,
            **med, "total_s": total, "total_ms_per_sample": 1000 * total / batch,
            "mb_per_s": nbytes / MB / total, "reps": reps}


def weight_state(params_target: int):
    """bf16 tensors of the real SD3.5-M transformer's parameter shapes, in name order, up to `params_target`
    parameters (at least one tensor)."""
    import diffusers
    import torch

    from flowbp_core.backbones import sd3

    with torch.device("meta"):
        model = diffusers.SD3Transformer2DModel(**sd3.REAL_TRANSFORMER)
    shapes = sorted((n, tuple(p.shape), p.numel()) for n, p in model.named_parameters())
    state, n = {}, 0
    for name, shape, numel in shapes:
        if state and n + numel > params_target:
            break
        state[name] = torch.full(shape, 0.5, dtype=torch.bfloat16)
        n += numel
    return state, n


def measure_weights(bucket_mb: float, fraction: float, reps: int) -> dict:
    """`full_state` publish (driver) and fetch (a rollout-side actor) of `fraction` of SD3.5-M's trainable state."""
    import ray

    from services.runtime import weight_sync
    from services.runtime.layout import transformer_params

    full = transformer_params("sd3", None)
    state, n = weight_state(int(full * fraction))
    sync = weight_sync.build("full_state", bucket_mb=bucket_mb, keep=1)
    _, Reader = _actors()
    reader = Reader.remote()
    pub, fetch = [], []
    nbytes = 0
    for v in range(reps + 1):
        handle = sync.publish(state, policy_version=v)
        f, got = ray.get(reader.fetch_weights.remote(handle))
        if not 0 < handle.nbytes - got < 2**20 * handle.stream.n_buckets:  # only the safetensors headers differ
            raise RuntimeError(f"fetched {got} tensor bytes of a {handle.nbytes}-byte publish")
        pub.append(handle.publish_seconds), fetch.append(f)
        nbytes = handle.nbytes
    ray.kill(reader)
    ray.kill(sync.server)
    scale = full / n
    p, f = median(pub[1:]), median(fetch[1:])
    return {"params_full": full, "params_sent": n, "fraction_sent": n / full, "bucket_mb": bucket_mb,
            "bytes_sent": nbytes, "publish_s_measured": p, "fetch_s_measured": f,
            "publish_s": p * scale, "fetch_s": f * scale, "total_s": (p + f) * scale,
            "mb_per_s": nbytes / MB / (p + f), "scaled_linearly": scale != 1.0, "reps": reps}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--px", type=int, nargs="+", default=[512, 1024])
    p.add_argument("--batch", type=int, default=8, help="samples per cache (a rollout worker's shard)")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--n-steps", type=int, default=25)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--weight-fraction", type=float, default=0.25, help="share of SD3.5-M's parameters sent")
    p.add_argument("--object-store-gb", type=float, default=6.0)
    p.add_argument("--out", default=str(REPO / "benchmarks/results/objstore.json"))
    a = p.parse_args()
    if not 0 < a.weight_fraction <= 1:
        p.error(f"--weight-fraction {a.weight_fraction}: must be in (0, 1]")
    import ray

    from services.localproc import init_local_ray

    cfg = sd35m_cfg(a.k, a.n_steps)
    init_local_ray(num_cpus=2, object_store_mb=int(a.object_store_gb * 1024), log_to_driver=False)
    try:
        caches = [measure_cache(cfg, px, a.batch, a.reps) for px in a.px]
        weights = measure_weights(cfg.runtime.weight_sync_bucket_mb, a.weight_fraction, a.reps)
    finally:
        ray.shutdown()
    result = {"machine": f"{platform.node()}: {os.cpu_count()} CPU cores (shared), "
                         f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM, no GPU",
              "ray": ray.__version__, "object_store_gb": a.object_store_gb,
              "load_average_1m_end": os.getloadavg()[0],
              "config": {"model": "SD3.5-Medium (deploy/configs/sd35.yaml)", "method": f"flowbp_sparse k={a.k}",
                         "n_steps": a.n_steps},
              "cache": caches, "weights": weights}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))
    print("| what | bytes | serialize+put ms | get+view ms | ms / sample | MB/s |")
    print("|---|---|---|---|---|---|")
    for c in caches:
        print(f"| cache {c['px']} px x{c['batch']} | {c['bytes'] / MB:.1f} MB | "
              f"{1000 * (c['serialize_s'] + c['put_s']):.1f} | {1000 * (c['get_s'] + c['view_s']):.2f} | "
              f"{c['total_ms_per_sample']:.2f} | {c['mb_per_s']:.0f} |")
    w = weights
    print(f"| weights full_state ({w['fraction_sent']:.2f} sent) | {w['bytes_sent'] / MB:.0f} MB | "
          f"publish {1000 * w['publish_s_measured']:.0f} | fetch {1000 * w['fetch_s_measured']:.0f} | - | "
          f"{w['mb_per_s']:.0f} |")
    print(f"full state ({w['params_full'] / 1e9:.2f} B params): publish {w['publish_s']:.2f} s + fetch "
          f"{w['fetch_s']:.2f} s{' (scaled linearly)' if w['scaled_linearly'] else ''}")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
