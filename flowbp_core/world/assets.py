"""Committed checkpoints of the embedded world: write with hashes, load with verification and clear errors.

Each checkpoint is a safetensors file whose metadata holds the model config (JSON), the data seed, the
training command and `content_sha256` (a hash of every tensor's name, dtype, shape and bytes, in sorted key
order: a file cannot hold its own file hash). A sidecar `<name>.manifest.json` holds the whole file's sha256.
Loading checks both, and any failure names the file and the command that regenerates it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

ASSETS_DIR = Path(__file__).resolve().parent / "assets"


class CheckpointError(RuntimeError):
    """A committed world checkpoint is missing, unreadable, or does not match its recorded hash."""


def content_sha256(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(repr(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def manifest_path(path: Path) -> Path:
    return path.with_name(path.name.replace(".safetensors", "") + ".manifest.json")


def save_checkpoint(
    tensors: dict[str, torch.Tensor],
    path: Path,
    *,
    config: dict,
    data_seed: int,
    command: str,
    extra: dict | None = None,
) -> str:
    """Atomically write `tensors` + metadata to `path` and its manifest; returns the file sha256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {
        "format": "flowbp-world-checkpoint/1",
        "config": json.dumps(config, sort_keys=True),
        "data_seed": str(data_seed),
        "command": command,
        "content_sha256": content_sha256(tensors),
    }
    for k, v in (extra or {}).items():
        meta[k] = v if isinstance(v, str) else json.dumps(v)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".tmp-")
    os.close(fd)
    save_file(tensors, tmp, metadata=meta)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; committed assets must be readable by everyone
    os.replace(tmp, path)
    digest = file_sha256(path)
    manifest = {
        "file": path.name,
        "sha256": digest,
        "bytes": path.stat().st_size,
        "content_sha256": meta["content_sha256"],
        "data_seed": data_seed,
        "command": command,
        "config": config,
        **{k: v for k, v in (extra or {}).items()},
    }
    mtmp = manifest_path(path).with_suffix(".json.tmp")
    mtmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(mtmp, manifest_path(path))
    return digest


def load_checkpoint(path: Path, *, regenerate: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Load and verify; returns (tensors, metadata with `config` decoded). Raises CheckpointError."""
    path = Path(path)
    hint = f"regenerate it with: {regenerate}"
    if not path.is_file():
        raise CheckpointError(f"world checkpoint {path} is missing; {hint}")
    man_path = manifest_path(path)
    if man_path.is_file():
        try:
            manifest = json.loads(man_path.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"manifest {man_path} is not valid JSON ({exc}); {hint}") from exc
        actual = file_sha256(path)
        if manifest.get("sha256") != actual:
            raise CheckpointError(
                f"world checkpoint {path} has sha256 {actual[:16]}..., but {man_path.name} records "
                f"{str(manifest.get('sha256'))[:16]}...: the file is corrupt or was replaced; {hint}"
            )
    try:
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
    except Exception as exc:  # safetensors raises several types for a damaged header/body
        raise CheckpointError(f"world checkpoint {path} cannot be read ({type(exc).__name__}: {exc}); {hint}") from exc
    want = meta.get("content_sha256")
    if want is None:
        raise CheckpointError(f"world checkpoint {path} has no content_sha256 in its metadata; {hint}")
    got = content_sha256(tensors)
    if got != want:
        raise CheckpointError(
            f"world checkpoint {path}: tensor contents hash {got[:16]}... "
            f"but its metadata records {want[:16]}...; {hint}"
        )
    meta["config"] = json.loads(meta.get("config", "{}"))
    return tensors, meta
