"""Atomic step checkpoints: `runs/<run_id>/step_<n>/`, complete only when its COMPLETE marker exists.

A step folder is written under a temporary name, flushed, renamed into place, and only then marked complete.
A crash at any point leaves either no folder, a `.tmp-*` folder (ignored and swept), or a folder without the
marker (ignored): resume never reads half a checkpoint.

Two layouts (`state.json`'s `layout`):
- `full`: `trainable.safetensors`, `ema.safetensors`, `optimizer.pt` (index-keyed), written by one process (a
  single-process run, a DDP-like learner group's rank 0, LoRA under FSDP from tensors gathered to rank 0).
- `sharded` (full fine-tuning under FSDP): `sharded/`, a torch distributed checkpoint (DCP) of the trainable
  weights and the optimizer state (both keyed by parameter name) and the EMA shadow (`ema.<i>`, as in `full`),
  every rank writing its own shards
  into the same temporary folder; rank 0 renames and marks it once every rank's shards are written. No rank
  gathers the model. DCP reshards on load, so it resumes on any number of FSDP ranks and into whole tensors
  (`load_sharded`: one process, or DDP-like ranks each loading everything), and `load_checkpoint` reads its
  weights and EMA as whole tensors (export, eval). A `full` checkpoint resumes under FSDP too (the learner loads
  it before sharding).
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
FULL, SHARDED = "full", "sharded"
SHARDED_DIR = "sharded"


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
        _finish(tmp, final, state, FULL, extra_writer)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep is not None:
        prune(run_dir, keep)
    return final


def _finish(tmp: Path, final: Path, state: CheckpointState, layout: str, extra_writer) -> None:
    """The writer's last part: metadata, flush, rename into place, then the COMPLETE marker."""
    if state.torch_rng is not None:
        torch.save(state.torch_rng, tmp / "rng.pt")
    meta = {"format_version": FORMAT_VERSION, "layout": layout, "step": state.step,
            "policy_version": state.policy_version, "created_at": time.time(), "metrics": state.metrics}
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
    _fsync_dir(final.parent)
    with open(final / COMPLETE, "w") as fh:
        fh.write(str(state.step))
        fh.flush()
        os.fsync(fh.fileno())
    _fsync_dir(final)


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
    """A complete checkpoint's state as whole tensors. A `sharded` one gives its weights and EMA (read from
    every rank's shards in this process) and no optimizer: resume from it with `load_sharded`."""
    path = Path(path)
    if not (path / COMPLETE).exists():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {COMPLETE} marker): it was interrupted "
                                f"while being written; use flowbp_core.checkpoint.latest_complete(run_dir)")
    meta = json.loads((path / "state.json").read_text())
    if meta.get("layout", FULL) == SHARDED:
        trainable, optimizer = _read_whole(path / SHARDED_DIR, "trainable"), None
        ema = _read_whole(path / SHARDED_DIR, "ema") or None
    else:
        trainable = load_file(str(path / "trainable.safetensors"), device=map_location)
        ema = (load_file(str(path / "ema.safetensors"), device=map_location)
               if (path / "ema.safetensors").exists() else None)
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



def layout(path: str | Path) -> str:
    """`full` or `sharded` (see the module docstring)."""
    return json.loads((Path(path) / "state.json").read_text()).get("layout", FULL)


# ------------------------------------------------------------------------------------ sharded (DCP) layout
@dataclass(frozen=True, kw_only=True)
class ShardedState:
    """What a sharded checkpoint holds, given as every rank's live objects.

    Attributes:
        step: steps done.
        policy_version: optimizer updates applied.
        module: the transformer; its trainable parameters are saved under their names (FSDP shards or whole).
        optimizer: the optimizer over those parameters; its state is saved keyed by parameter name.
        ema_shadow: the EMA shadow, one tensor per trainable parameter in their order (laid out like them), or None.
        config: the run config as a dict (rank 0 writes it).
        metrics: numbers for `list_complete` (loss, reward_mean).
        torch_rng: rank 0's torch RNG state.
    """

    step: int
    policy_version: int
    module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    ema_shadow: list[torch.Tensor] | None = None
    config: dict[str, Any] | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    torch_rng: torch.Tensor | None = None


def _group():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _dcp_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer,
               ema_shadow: list[torch.Tensor] | None) -> dict[str, Any]:
    """The DCP state dict: views of the live tensors (DCP saves them, and loads into them in place)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    named = {n: p for n, p in module.named_parameters() if p.requires_grad}
    state: dict[str, Any] = {"trainable": {n: p.detach() for n, p in named.items()},
                             "optimizer": get_optimizer_state_dict(module, optimizer)}
    if ema_shadow is not None:
        if len(ema_shadow) != len(named):
            raise ValueError(f"ema_shadow has {len(ema_shadow)} tensors for {len(named)} trainable parameters")
        state["ema"] = {f"ema.{i}": t for i, t in enumerate(ema_shadow)}  # the `full` layout's keys
    return state


def _share(value: Any) -> Any:
    """Rank 0's `value` on every rank (itself without a process group)."""
    dist = _group()
    if dist is None:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def save_sharded_checkpoint(run_dir: str | Path, state: ShardedState, keep: int | None = None,
                            extra_writer=None) -> Path | None:
    """Write `state` as a `sharded` checkpoint, atomically. Collective: every rank calls it and writes its own
    shards; rank 0 names the temporary folder, and renames and marks it after every rank's shards are written.
    Returns the folder on rank 0, None elsewhere. The folder must be on a filesystem every rank shares."""
    import torch.distributed.checkpoint as dcp

    dist = _group()
    rank = dist.get_rank() if dist is not None else 0
    run_dir = Path(run_dir)
    final = step_dir(run_dir, state.step)
    name = None
    if rank == 0 and not (final / COMPLETE).exists():  # never overwrite a good one
        run_dir.mkdir(parents=True, exist_ok=True)
        name = f"{final.name}.tmp-{os.getpid()}-{time.monotonic_ns()}"
        (run_dir / name).mkdir()
    name = _share(name)
    if name is None:
        return final if rank == 0 else None
    tmp = run_dir / name
    try:
        # every rank writes (and fsyncs) its shards; rank 0 writes the metadata once all are written
        dcp.save(_dcp_state(state.module, state.optimizer, state.ema_shadow),
                 storage_writer=dcp.FileSystemWriter(str(tmp / SHARDED_DIR)), no_dist=dist is None)
        if rank == 0:
            _finish(tmp, final, CheckpointState(step=state.step, policy_version=state.policy_version, trainable={},
                                                config=state.config, metrics=state.metrics,
                                                torch_rng=state.torch_rng), SHARDED, extra_writer)
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dist is not None:
        dist.barrier()  # no rank goes on (or resumes) before the marker exists
    if rank == 0 and keep is not None:
        prune(run_dir, keep)
    return final if rank == 0 else None


def load_sharded(path: str | Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 ema_shadow: list[torch.Tensor] | None = None) -> CheckpointState:
    """Resume from a `sharded` checkpoint into live objects laid out any way: FSDP shards on any number of ranks
    (each reads its part), or whole tensors (one process, or every DDP-like rank). Collective when a process
    group exists: every rank calls it. Loads the trainable weights, the optimizer state and the EMA shadow (when
    given) in place; returns the step, policy version, metrics and rng (no tensors)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    path = Path(path)
    if not (path / COMPLETE).exists() or layout(path) != SHARDED:
        raise FileNotFoundError(f"{path} is not a complete sharded checkpoint (a {COMPLETE} marker and layout "
                                f"{SHARDED!r} in state.json)")
    state = _dcp_state(module, optimizer, ema_shadow)
    with torch.no_grad():
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(path / SHARDED_DIR)), no_dist=_group() is None)
    set_optimizer_state_dict(module, optimizer, state["optimizer"])
    meta = json.loads((path / "state.json").read_text())
    rng = torch.load(path / "rng.pt", weights_only=True) if (path / "rng.pt").exists() else None
    return CheckpointState(step=int(meta["step"]), policy_version=int(meta["policy_version"]), trainable={},
                           metrics=meta.get("metrics", {}), torch_rng=rng)


def _read_whole(folder: Path, group: str) -> dict[str, torch.Tensor]:
    """The tensors under `group` of a DCP folder, whole, read in this process alone (shapes from its metadata)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(folder))
    prefix = f"{group}."
    out = {k[len(prefix):]: torch.empty(tuple(m.size), dtype=m.properties.dtype)
           for k, m in reader.read_metadata().state_dict_metadata.items()
           if k.startswith(prefix) and isinstance(m, TensorStorageMetadata)}
    if out:
        dcp.load({group: out}, storage_reader=reader, no_dist=True)
    return out
