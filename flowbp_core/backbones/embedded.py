"""The `embedded` backbone: the project's own small SD3 transformer in pixel space, with the frozen MiniLM encoder.

It is an `SD3Backbone` (same velocity, guidance, LoRA, export code) with three differences: no VAE (latents are
32x32 RGB images in [-1, 1]), MiniLM as the text encoder (token states as context, pooled embedding as the
pooled projection, cached per prompt), and a linear sigma schedule (shift 1: a 32x32 image needs no shift
toward high noise). It runs in float32 on a CPU: bf16 autocast (its training numerics) is 17x slower on CPUs
without native bf16 (measured on an AMD EPYC with AVX2 only); `autocast=True` turns it on.

`build("embedded")` loads the committed, hash-checked checkpoint (flowbp_core/world/assets/base/); a missing or
corrupt file raises CheckpointError naming the file and the command that regenerates it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from flowbp_core.dtypes import resolve_dtype
from flowbp_core.backbones.adapter import text_encoder_for
from flowbp_core.backbones.base import BackbonePreset, LoRAConfig, register
from flowbp_core.backbones.sd3 import SD3Backbone
from flowbp_core.guidance import GuidanceConfig

PRESET = BackbonePreset(method_preset="sd35", n_steps=20, guidance=GuidanceConfig("true", 4.0, True), resolution=32)


class MiniLMTextEncoder:
    """TextEncoder protocol over the world's MiniLM encoder: encode(prompts) -> (states [B,16,384], pooled [B,384])."""

    def __init__(self, encoder=None):
        from flowbp_core.world.text import shared_encoder

        self.encoder = encoder or shared_encoder()

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.encoder.encode(list(prompts))
        return out["prompt_embeds"], out["pooled_prompt_embeds"]


@register("embedded")
class EmbeddedBackbone(SD3Backbone):
    name = "embedded"

    def __init__(self, transformer, text_encoder=None, *, autocast: bool = False, preset: BackbonePreset = PRESET,
                 text_encoders: bool = True, **kw):
        """`text_encoders=False` (with no `text_encoder` given) loads no MiniLM: a learner's conditioning comes in
        the caches."""
        kw.setdefault("shift", 1.0)
        if text_encoder is None:
            text_encoder = text_encoder_for(type(self).__name__, text_encoders, MiniLMTextEncoder)
        super().__init__(transformer, None, text_encoder, preset=preset, **kw)
        self.autocast = bool(autocast)
        self.checkpoint_meta: dict = {}

    def _forward(self, x, sigma, states, pooled, distilled_scale):
        use = self.autocast and x.device.type == "cpu" and self.dtype == torch.float32
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use):
            out = super()._forward(x, sigma, states, pooled, distilled_scale)
        return out.to(x.dtype)

    def pipeline(self, scheduler=None):
        raise ValueError("the embedded backbone is not a diffusers pipeline (pixel space, MiniLM text); "
                         "export(path) saves its transformer or LoRA")

    # -------------------------------------------------------------------------------------------- constructors
    @classmethod
    def default(cls, *, dtype=torch.float32, device="cpu", **kw) -> "EmbeddedBackbone":
        """The committed base model."""
        from flowbp_core.world.base_model import BASE_CHECKPOINT

        return cls.from_pretrained(BASE_CHECKPOINT, dtype=dtype, device=device, **kw)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype=torch.float32, device="cpu",
                        local_files_only: bool = True, **kw) -> "EmbeddedBackbone":
        """A world checkpoint file (`transformer.safetensors`) or a folder holding one."""
        from flowbp_core.world.base_model import load_base_transformer

        del local_files_only  # never downloads
        p = Path(path)
        if p.is_dir():
            p = p / "transformer.safetensors"
        transformer, meta = load_base_transformer(p)
        bb = cls(transformer, **kw)
        bb.checkpoint_meta = meta
        return bb.to(device).cast(resolve_dtype(dtype))

    @classmethod
    def tiny(cls, seed: int = 0, *, dtype=torch.float32, device="cpu", **kw) -> "EmbeddedBackbone":
        """Random 2-layer pixel-space transformer with the real MiniLM encoder (for tests)."""
        from flowbp_core.world.base_model import BaseModelConfig, build_transformer

        torch.manual_seed(seed)
        transformer = build_transformer(BaseModelConfig(num_layers=2, num_attention_heads=2, attention_head_dim=16))
        return cls(transformer, **kw).to(device).cast(resolve_dtype(dtype))


def load_policy(checkpoint: Path | None):
    """The committed base model, with the LoRA of a FlowBP checkpoint folder applied when one is given."""
    bb = EmbeddedBackbone.default()
    if checkpoint is None:
        return bb
    from safetensors.torch import load_file

    cfg_path = checkpoint / "config.json"
    weights = checkpoint / "trainable.safetensors"
    if not weights.exists() or not cfg_path.exists():
        raise FileNotFoundError(f"--policy {checkpoint}: expected a FlowBP checkpoint folder "
                                "with trainable.safetensors "
                                "and config.json (a runs/<id>/step_<n> folder)")
    lora = json.loads(cfg_path.read_text())["backbone"]["lora"]
    bb.apply_lora(LoRAConfig(**lora))
    bb.load_trainable_state_dict(load_file(str(weights)))
    return bb
