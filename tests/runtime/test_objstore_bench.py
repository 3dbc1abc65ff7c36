"""benchmarks/pipeline.py's efficiency formula (`model_efficiency`) in closed form on made-up stage times, and
benchmarks/objstore.py's measurements at tiny size on the session's real Ray: every field there and finite."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT))
    spec.loader.exec_module(mod)
    return mod


pipeline = _load("pipeline")
objstore = _load("objstore")

# Made-up per-sample stage times (s) and transfers: rollout 1.0, learner 2.0, put 0.1, get 0.05; per step:
# publish 3.0, fetch 4.0; batch 10.
T = dict(rollout_s=1.0, learn_s=2.0, batch=10, cache_put_s=0.1, cache_get_s=0.05, weights_publish_s=3.0,
         weights_fetch_s=4.0)


def test_colocated_is_every_stage_and_transfer_in_series():
    r = pipeline.model_efficiency(**T, rollout_gpus=None)
    # compute 10 x (1 + 2) = 30; transfer 10 x 0.15 + 3 + 4 = 8.5
    assert r["compute_s"] == pytest.approx(30.0)
    assert r["transfer_s"] == pytest.approx(8.5)
    assert r["step_s"] == pytest.approx(38.5)
    assert r["efficiency"] == pytest.approx(30 / 38.5)
    assert r["transfer_share_of_step"] == pytest.approx(8.5 / 38.5)
    assert r["samples_per_s"] == pytest.approx(10 / 38.5)


def test_async_learner_bound_charges_the_learner_side_transfers():
    r = pipeline.model_efficiency(**T, rollout_gpus=2)
    # rollout side 10 x 1.1 / 2 + 4 = 9.5; learner side 10 x 2.05 + 3 = 23.5; compute max(5, 20) = 20
    assert r["step_s"] == pytest.approx(23.5)
    assert r["compute_s"] == pytest.approx(20.0)
    assert r["efficiency"] == pytest.approx(20 / 23.5)
    assert r["transfer_not_overlapped_s"] == pytest.approx(3.5)


def test_async_rollout_bound_charges_the_rollout_side_transfers():
    r = pipeline.model_efficiency(**{**T, "rollout_s": 8.0}, rollout_gpus=2)
    # rollout side 10 x 8.1 / 2 + 4 = 44.5; learner side 23.5; compute max(40, 20) = 40
    assert r["step_s"] == pytest.approx(44.5)
    assert r["efficiency"] == pytest.approx(40 / 44.5)
    assert r["transfer_share_of_step"] == pytest.approx(8.5 / 44.5)


def test_no_transfer_is_efficiency_one():
    zero = {**T, "cache_put_s": 0.0, "cache_get_s": 0.0, "weights_publish_s": 0.0, "weights_fetch_s": 0.0}
    for r in (None, 1, 3):
        assert pipeline.model_efficiency(**zero, rollout_gpus=r)["efficiency"] == pytest.approx(1.0)


def test_bad_gpu_count_names_the_field():
    with pytest.raises(ValueError, match="rollout_gpus=0"):
        pipeline.model_efficiency(**T, rollout_gpus=0)


def _finite_positive(d: dict, keys) -> None:
    for k in keys:
        assert math.isfinite(d[k]) and d[k] > 0, (k, d[k])


def test_objstore_smoke_on_real_ray(ray_client):
    cfg = objstore.sd35m_cfg(k=4, n_steps=25)
    c = objstore.measure_cache(cfg, px=64, batch=1, reps=1)
    # K=4, N=25 flowbp_sparse keeps 4 states and 21 velocities a sample
    assert (c["kept_states"], c["kept_velocities"]) == (4.0, 21.0)
    _finite_positive(c, ["bytes", "serialize_s", "put_s", "get_s", "view_s", "total_s", "total_ms_per_sample",
                         "mb_per_s"])
    w = objstore.measure_weights(bucket_mb=1.0, fraction=1e-4, reps=1)
    assert 0 < w["params_sent"] <= w["params_full"] and w["scaled_linearly"]
    assert w["publish_s"] == pytest.approx(w["publish_s_measured"] * w["params_full"] / w["params_sent"])
    _finite_positive(w, ["bytes_sent", "publish_s", "fetch_s", "total_s", "mb_per_s"])


def test_collective_rows_come_from_the_same_gpu_handoff(tmp_path):
    # made-up handoff: 4.5 GB, publish (pack + share) 0.2 s of a 0.5 s handoff; 50 GB/s between GPUs
    path = tmp_path / "gpu_rollout_x.json"
    path.write_text('{"smoke": false, "device": "H200", "handoff": {"transport": "cuda_ipc", "gbytes": 4.5, '
                    '"warm_s": 0.5, "warm_publish_s": 0.2}}')
    c = pipeline.collective_inputs(path, 50.0)
    assert c["colocated"]["weights_publish_s"]["value"] == pytest.approx(0.2)
    assert c["colocated"]["weights_fetch_s"]["value"] == pytest.approx(0.3)
    assert c["separate"]["weights_fetch_s"]["value"] == pytest.approx(4.5 / 50 + 0.3)
    assert c["separate"]["weights_fetch_s"]["kind"] == "computed"
    path.write_text('{"smoke": true, "handoff": {}}')
    with pytest.raises(SystemExit, match="no real-size handoff"):
        pipeline.collective_inputs(path, 50.0)
