"""Atomic step checkpoints: `runs/<run_id>/step_<n>/`, complete only when its COMPLETE marker exists.

A step folder is written under a temporary name, flushed, renamed into place, and only then marked complete.
A crash at any point leaves either no folder, a `.tmp-*` folder (ignored and swept), or a folder without the
marker (ignored): resume never reads half a checkpoint. The layout does not depend on how many workers wrote it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

COMPLETE = "COMPLETE"
STEP_PREFIX = "step_"
FORMAT_VERSION = 1


@dataclass
class CheckpointState:
    """Everything needed to continue a run exactly (the data position is the step: prompts and seeds are
    derived from (seed, step), so no sampler state needs saving)."""

    step: int
    policy_version: int
    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None = None
    ema: dict[str, torch.Tensor] | None = None
    config: dict[str, Any] | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    torch_rng: torch.Tensor | None = None


@dataclass
class CheckpointInfo:
    step: int
    path: str
    policy_version: int
    created_at: float
    metrics: dict[str, float]


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / f"{STEP_PREFIX}{step}"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _contiguous(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}


def save_checkpoint(run_dir: str | Path, state: CheckpointState, keep: int | None = None,
                    extra_writer=None) -> Path:
    """Write `state` atomically; `extra_writer(tmp_path)` may add files (e.g. a diffusers LoRA export)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = step_dir(run_dir, state.step)
    if (final / COMPLETE).exists():
        return final  # already written (e.g. a resumed run reaching the same step): never overwrite a good one
    tmp = run_dir / f"{final.name}.tmp-{os.getpid()}-{time.monotonic_ns()}"
    tmp.mkdir()
    try:
        save_file(_contiguous(state.trainable), str(tmp / "trainable.safetensors"))
        if state.ema is not None:
            save_file(_contiguous(state.ema), str(tmp / "ema.safetensors"))
        if state.optimizer is not None:
            torch.save(state.optimizer, tmp / "optimizer.pt")
        if state.torch_rng is not None:
            torch.save(state.torch_rng, tmp / "rng.pt")
        meta = {"format_version": FORMAT_VERSION, "step": state.step, "policy_version": state.policy_version,
                "created_at": time.time(), "metrics": state.metrics}
        (tmp / "state.json").write_text(json.dumps(meta, indent=2))
        if state.config is not None:
            (tmp / "config.json").write_text(json.dumps(state.config, indent=2, sort_keys=True))
        if extra_writer is not None:
            extra_writer(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if final.exists():  # an incomplete leftover of a crashed writer: replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(run_dir)
        with open(final / COMPLETE, "w") as fh:
            fh.write(str(state.step))
            fh.flush()
            os.fsync(fh.fileno())
        _fsync_dir(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep is not None:
        prune(run_dir, keep)
    return final


def list_complete(run_dir: str | Path) -> list[CheckpointInfo]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    out = []
    for d in run_dir.iterdir():
        if not d.is_dir() or not d.name.startswith(STEP_PREFIX) or ".tmp-" in d.name:
            continue
        try:
            step = int(d.name[len(STEP_PREFIX):])
        except ValueError:
            continue
        if not (d / COMPLETE).exists():
            continue
        try:
            meta = json.loads((d / "state.json").read_text())
        except (OSError, json.JSONDecodeError):
            continue
        out.append(CheckpointInfo(step=step, path=str(d), policy_version=int(meta.get("policy_version", step)),
                                  created_at=float(meta.get("created_at", 0.0)), metrics=meta.get("metrics", {})))
    return sorted(out, key=lambda c: c.step)


def latest_complete(run_dir: str | Path) -> Path | None:
    done = list_complete(run_dir)
    return Path(done[-1].path) if done else None


def load_checkpoint(path: str | Path, map_location: str = "cpu") -> CheckpointState:
    path = Path(path)
    if not (path / COMPLETE).exists():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {COMPLETE} marker): it was interrupted "
                                f"while being written; use flowbp_core.checkpoint.latest_complete(run_dir)")
    meta = json.loads((path / "state.json").read_text())
    trainable = load_file(str(path / "trainable.safetensors"), device=map_location)
    ema = load_file(str(path / "ema.safetensors"), device=map_location) if (path / "ema.safetensors").exists() else None
    optimizer = (torch.load(path / "optimizer.pt", map_location=map_location, weights_only=False)
                 if (path / "optimizer.pt").exists() else None)
    rng = torch.load(path / "rng.pt", weights_only=True) if (path / "rng.pt").exists() else None
    config = json.loads((path / "config.json").read_text()) if (path / "config.json").exists() else None
    return CheckpointState(step=int(meta["step"]), policy_version=int(meta["policy_version"]), trainable=trainable,
                           optimizer=optimizer, ema=ema, config=config, metrics=meta.get("metrics", {}),
                           torch_rng=rng)


def prune(run_dir: str | Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; sweep temp folders of writers that are gone."""
    run_dir = Path(run_dir)
    done = list_complete(run_dir)
    for info in done[:-keep] if keep > 0 else []:
        shutil.rmtree(info.path, ignore_errors=True)
    for d in run_dir.glob(f"{STEP_PREFIX}*.tmp-*"):
        try:
            pid = int(d.name.split(".tmp-")[1].split("-")[0])
        except (IndexError, ValueError):
            continue
        if pid != os.getpid() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(d, ignore_errors=True)

