"""Export trained weights in the formats diffusers users load.

- LoRA: `pytorch_lora_weights.safetensors` written by the family's own pipeline class
  (`StableDiffusion3Pipeline` / `FluxPipeline` / `Flux2KleinPipeline.save_lora_weights`), with the peft config
  in the file's metadata so rank and alpha survive. Load with `pipe.load_lora_weights(path)`.
- Full fine-tune: the transformer's `save_pretrained` under `<path>/transformer`. Load with
  `<TransformerClass>.from_pretrained(path, subfolder="transformer")` and hand it to the pipeline.

Why the pipeline's own writer: the key prefix ("transformer.") and the metadata layout are what its loader
expects, and they change between diffusers versions; writing them by hand would break silently.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import diffusers
import torch

from flowbp_core.backbones import lora as lora_mod

LORA_FILE = "pytorch_lora_weights.safetensors"
MANIFEST = "flowbp_export.json"


@dataclass(frozen=True)
class ExportResult:
    kind: Literal["lora", "full"]
    path: Path
    files: tuple[str, ...]
    pipeline_class: str
    load_hint: str


def _pipeline_class(name: str):
    if not name or not hasattr(diffusers, name):
        raise ValueError(f"no diffusers pipeline class {name!r} to export with")
    return getattr(diffusers, name)


def export_lora(transformer, pipeline_class_name: str, path: str | os.PathLike,
                layers: dict[str, torch.Tensor] | None = None) -> ExportResult:
    """Write the LoRA adapter of `transformer` in the `load_lora_weights` format of `pipeline_class_name`.

    `layers`: the adapter weights when the caller gathered them already (`lora_state_for_diffusers` of a sharded
    transformer, made full); by default they are read from `transformer`."""
    if not lora_mod.has_lora(transformer):
        raise ValueError("the transformer carries no LoRA adapter: apply_lora(...) before training, or use "
                         "export_full for a full fine-tune")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    _pipeline_class(pipeline_class_name).save_lora_weights(
        str(out),
        transformer_lora_layers=layers if layers is not None else lora_mod.lora_state_for_diffusers(transformer),
        transformer_lora_adapter_metadata=lora_mod.lora_metadata(transformer), safe_serialization=True)
    hint = f"{pipeline_class_name}.from_pretrained(<base>).load_lora_weights({str(out)!r})"
    return _finish(out, "lora", pipeline_class_name, hint)


def export_full(transformer, pipeline_class_name: str, path: str | os.PathLike,
                state: dict[str, torch.Tensor] | None = None) -> ExportResult:
    """Write the whole transformer with `save_pretrained` under `<path>/transformer` (safetensors).

    `state`: the full weights when the live transformer is sharded (FSDP) and the caller gathered them; they are
    written as the single-file layout `save_pretrained` uses (its config and `diffusion_pytorch_model.safetensors`),
    which `from_pretrained` reads the same way."""
    if lora_mod.has_lora(transformer):
        raise ValueError("the transformer carries a LoRA adapter: export_lora writes it in the diffusers format")
    out = Path(path)
    (out / "transformer").mkdir(parents=True, exist_ok=True)
    if state is None:
        transformer.save_pretrained(str(out / "transformer"), safe_serialization=True)
    else:
        from diffusers.utils import SAFETENSORS_WEIGHTS_NAME
        from safetensors.torch import save_file

        transformer.save_config(str(out / "transformer"))
        save_file({k: v.contiguous() for k, v in state.items()}, str(out / "transformer" / SAFETENSORS_WEIGHTS_NAME),
                  metadata={"format": "pt"})
    cls = type(transformer).__name__
    hint = (f"{pipeline_class_name}.from_pretrained(<base>, transformer={cls}.from_pretrained({str(out)!r}, "
            "subfolder='transformer'))")
    return _finish(out, "full", pipeline_class_name, hint)


def export_backbone(backbone, path: str | os.PathLike, gathered: dict[str, torch.Tensor] | None = None) -> ExportResult:
    """LoRA export when the backbone carries an adapter, else the full transformer. `gathered`: the full
    tensors of a sharded transformer (see `export_lora` / `export_full`)."""
    if lora_mod.has_lora(backbone.transformer):
        return export_lora(backbone.transformer, backbone.pipeline_class_name, path, layers=gathered)
    return export_full(backbone.transformer, backbone.pipeline_class_name, path, state=gathered)


def _finish(out: Path, kind: str, pipeline_class_name: str, hint: str) -> ExportResult:
    files = tuple(sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name != MANIFEST))
    (out / MANIFEST).write_text(json.dumps({"kind": kind, "pipeline_class": pipeline_class_name,
                                            "files": list(files), "load": hint}, indent=2))
    return ExportResult(kind, out, files, pipeline_class_name, hint)  # type: ignore[arg-type]
