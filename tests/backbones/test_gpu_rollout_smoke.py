"""benchmarks/gpu_rollout.py keeps working: its --smoke run (tiny SD3 on the CPU, in its own process without Ray,
as the device runs it) writes every stage's numbers, finite and positive, and the targets computed from them; its FLOP
formula equals a forward-hook count of every matmul, on the tiny and (meta device) the real config."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_rollout.py"


def _load():
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("gpu_rollout", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _numbers(obj, path="report"):
    """Every number in the report with its path (booleans are verdicts, not measurements)."""
    if isinstance(obj, bool):
        return
    if isinstance(obj, (int, float)):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _numbers(v, f"{path}[{i}]")


@pytest.mark.slow  # ~40 s of CPU: every stage once on the tiny config, plus a spawned handoff process
def test_smoke_run_writes_every_stage_finite_and_positive(tmp_path):
    # the device has no Ray: a `ray` that cannot be imported comes first on the path
    (tmp_path / "no_ray" / "ray").mkdir(parents=True)
    (tmp_path / "no_ray" / "ray" / "__init__.py").write_text("raise ImportError('no Ray on the GPU machine')\n")
    env = dict(os.environ, PYTHONPATH=f"{tmp_path / 'no_ray'}{os.pathsep}{ROOT}", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    files = list(tmp_path.glob("gpu_rollout_*.json"))
    assert len(files) == 1
    rep = json.loads(files[0].read_text())
    assert rep["smoke"] is True and rep["cuda"] == torch.cuda.is_available()
    assert rep["skipped"] == [], rep["skipped"]
    rows = {(r["variant"], r["compiled"], r["batch"]) for r in rep["rollout"]}
    for b in (1, 4, 16):
        for v in ("plain", "merged", "unmerged"):
            assert (v, False, b) in rows, (v, b)
        assert ("merged", True, b) in rows and ("plain", True, b) in rows, b
    assert ("unmerged", True, 16) in rows
    assert rep["handoff"]["transport"] == ("cuda_ipc" if rep["cuda"] else "cpu_shared_memory")
    assert 0 < rep["handoff"]["warm_publish_s"] < rep["handoff"]["warm_s"] and rep["handoff"]["buckets"] >= 1
    params = rep["params_b"] * 1e9
    assert rep["handoff"]["gbytes"] * 1e9 == pytest.approx(params * 4)  # every weight, float32 on the CPU
    assert rep["learner"]["method"] == "flowbp_sparse" and rep["learner"]["k"] == 4
    assert rep["flops"]["linear_per_row"] == rep["flops"]["linear_hooked_per_row"]
    assert rep["limit_ms_per_sample_step"] == pytest.approx(
        1e3 * rep["flops"]["per_sample_step"] / (rep["peak_tflops"] * 1e12))
    t = rep["targets"]
    ms = {(r["variant"], r["compiled"], r["batch"]): r["ms_per_sample_step"] for r in rep["rollout"]}
    assert t["compiled_merged_b16_over_limit"]["ratio"] == pytest.approx(
        ms[("merged", True, 16)] / rep["limit_ms_per_sample_step"])
    assert t["merged_over_plain"]["ratios"]["eager_b4"] == pytest.approx(ms[("merged", False, 4)]
                                                                         / ms[("plain", False, 4)])
    assert len(t["merged_over_plain"]["ratios"]) == 6
    numbers = list(_numbers(rep))
    assert len(numbers) > 60
    bad = [(p, v) for p, v in numbers if not (math.isfinite(v) and v > 0)]
    assert not bad, bad


@pytest.mark.slow  # ~10-40 s: builds the real config on the meta device
def test_flop_formula_equals_the_hooked_count():
    from diffusers import SD3Transformer2DModel

    from flowbp_core.backbones import sd3

    mod = _load()
    for cfg, n_img, n_txt, dev in ((sd3.TINY_TRANSFORMER, 64, 16, "cpu"), (sd3.REAL_TRANSFORMER, 1024, 333, "meta")):
        with torch.device(dev):
            tr = SD3Transformer2DModel(**cfg)
            side = 2 * int(n_img ** 0.5)
            x, s = torch.zeros(1, 16, side, side), torch.zeros(1, n_txt, cfg["joint_attention_dim"])
            p, t = torch.zeros(1, cfg["pooled_projection_dim"]), torch.zeros(1)
        hooked = mod.hooked_linear_flops(tr, lambda: tr(hidden_states=x, encoder_hidden_states=s,
                                                        pooled_projections=p, timestep=t, return_dict=False))
        assert mod.transformer_flops(cfg, n_img, n_txt)["linear_per_row"] == hooked
    real = mod.transformer_flops(sd3.REAL_TRANSFORMER, 1024, 333)
    assert real["per_sample_step"] == 2 * real["per_row"]
    assert 4.8e12 < real["per_sample_step"] < 5.0e12  # the docstring's 4.89 TFLOP a guided sample-step


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message printed without CUDA")
def test_real_size_without_cuda_says_so_and_stops(tmp_path, capsys):
    assert _load().main(["--out", str(tmp_path)]) == 2
    assert "NO CUDA DEVICE AVAILABLE" in capsys.readouterr().out
    assert not list(tmp_path.glob("*.json"))
