"""benchmarks/gpu_step.py keeps working: its --smoke mode runs every backbone, method and mode on tiny configs."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_step.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_step", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow  # ~30 s of CPU: every backbone x method x mode once
def test_smoke_mode_runs_and_writes_the_table(tmp_path, capsys):
    mod = _load()
    rc = mod.main(["--smoke", "--steps", "3", "--k", "2", "--out", str(tmp_path), "--budget-s", "600"])
    assert rc == 0
    out = capsys.readouterr().out
    files = list(tmp_path.glob("gpu_step_*.json"))
    assert len(files) == 1
    rep = json.loads(files[0].read_text())
    assert rep["smoke"] is True and rep["cuda"] == torch.cuda.is_available()
    if not torch.cuda.is_available():
        assert "NO CUDA DEVICE AVAILABLE" in out and files[0].name == "gpu_step_smoke_cpu.json"
    items = {(r["backbone"], r["mode"], r["item"]) for r in rep["rows"] if r["status"] == "ok"}
    for b in ("sd3", "flux1", "flux2"):
        for m in ("full", "lora"):
            for it in ("floor", "fwd_bwd", "decode_rew", "rollout", "flowbp_sparse", "flowbp_lagrange", "draft_k"):
                assert (b, m, it) in items, (b, m, it)
    assert all(r["seconds"] > 0 for r in rep["rows"] if r["status"] == "ok")
    assert {(s["backbone"], s["mode"]) for s in rep["summary"] if "sparse_over_ideal" in s} == {
        (b, m) for b in ("sd3", "flux1", "flux2") for m in ("full", "lora")}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message printed without CUDA")
def test_real_size_without_cuda_says_so_and_stops(tmp_path, capsys):
    rc = _load().main(["--out", str(tmp_path)])
    assert rc == 2
    assert "NO CUDA DEVICE AVAILABLE" in capsys.readouterr().out
    assert not list(tmp_path.glob("*.json"))
