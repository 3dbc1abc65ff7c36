"""FLUX.2-Klein-base adapter: `Flux2Transformer2DModel` + `AutoencoderKLFlux2` (32 channels) + Qwen3.

Conventions (diffusers `Flux2KleinPipeline`): the sampler integrates the *patchified, batch-norm-normalised*
latents [B, 4 x 32, H/16, W/16], the space the model's noise lives in. `velocity` flattens them to tokens with
4-D ids (t, h, w, l) and calls the transformer with timestep = sigma and no guidance embedding; guidance is true
CFG (4.0) against the empty prompt, negative branch detached. The schedule uses FLUX.2's empirical mu(L, N).
Decode undoes the batch norm with the VAE's running statistics, unpatchifies and runs the VAE decoder.
"""

from __future__ import annotations

import os

import torch

from flowbp_core.backbones.adapter import (DiffusersBackbone, check_pipeline_source, saved_settings, text_components,
                                           text_encoder_for)
from flowbp_core.backbones.base import BackbonePreset, TextEncoder, register
from flowbp_core.backbones.sd3 import vae_scale_factor
from flowbp_core.backbones.text import Qwen3TextEncoder, tiny_qwen_tokenizer
from flowbp_core.dtypes import resolve_dtype
from flowbp_core.guidance import GuidanceConfig
from flowbp_core.schedules import Schedule, make_schedule

PRESET = BackbonePreset(method_preset="flux2", n_steps=25, guidance=GuidanceConfig("true", 4.0, True),
                        resolution=512)
PIPELINE_CLASSES = ("Flux2KleinPipeline",)
TEXT_COMPONENTS = ("tokenizer", "text_encoder")

# FLUX.2-Klein-base-9B transformer (no guidance embedding) and the FLUX.2 VAE, for benchmarks.
REAL_TRANSFORMER = dict(patch_size=1, in_channels=128, num_layers=8, num_single_layers=24, attention_head_dim=128,
                        num_attention_heads=32, joint_attention_dim=12288, timestep_guidance_channels=256,
                        mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, guidance_embeds=False)
REAL_VAE: dict = {}  # AutoencoderKLFlux2's defaults are the released VAE (32 latent channels, 2x2 patches)
REAL_TEXT = dict(seq_len=512, dim=12288, pooled_dim=0)  # Qwen3-8B layers 9/18/27 stacked: 3 x 4096

TINY_RESOLUTION = 32
TINY_QWEN_HIDDEN = 16
TINY_TRANSFORMER = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                        num_attention_heads=2, joint_attention_dim=3 * TINY_QWEN_HIDDEN, mlp_ratio=3.0,
                        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False)
TINY_VAE = dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                norm_num_groups=4, sample_size=TINY_RESOLUTION)
TINY_TEXT_LEN = 48  # the chat template alone is ~40 byte-level tokens


def patchify(x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)


def unpatchify(x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    return x.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // 4, h * 2, w * 2)


def latent_ids(h: int, w: int, device) -> torch.Tensor:
    """(h*w, 4) ids (t=0, row, column, l=0), row-major like the pipeline's cartesian product."""
    one = torch.arange(1)
    return torch.cartesian_prod(one, torch.arange(h), torch.arange(w), one).to(device)


def text_ids(n: int, device) -> torch.Tensor:
    one = torch.arange(1)
    return torch.cartesian_prod(one, one, one, torch.arange(n)).to(device)


def bn_stats(vae) -> tuple[torch.Tensor, torch.Tensor]:
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    return mean, std


@register("flux2")
class Flux2Backbone(DiffusersBackbone):
    name = "flux2"
    pipeline_class_name = "Flux2KleinPipeline"
    default_lora_targets = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj",
                            "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out", "attn.to_qkv_mlp_proj")

    def __init__(self, transformer, vae, text_encoder: TextEncoder, *, preset: BackbonePreset = PRESET,
                 negative_prompt: str = "", **common):
        super().__init__(transformer, vae, text_encoder, preset=preset, negative_prompt=negative_prompt, **common)

    @property
    def supports_distilled_guidance(self) -> bool:  # type: ignore[override]
        return bool(self.transformer.config.guidance_embeds)

    @property
    def size_multiple(self) -> int:
        return vae_scale_factor(self.vae) * 2

    def latent_shape(self, batch: int) -> tuple[int, ...]:
        h, w = self._latent_hw(vae_scale_factor(self.vae) * 2)
        return (batch, self.transformer.config.in_channels, h, w)

    def image_seq_len(self) -> int:
        _, _, h, w = self.latent_shape(1)
        return h * w

    def schedule(self, n_steps: int | None = None) -> Schedule:
        return make_schedule("flux2", n_steps or self.preset.n_steps, image_seq_len=self.image_seq_len())

    def _forward(self, x, sigma, states, pooled, distilled_scale):
        b, c, h, w = x.shape
        dt = self.dtype
        guidance = None
        if distilled_scale is not None:
            guidance = torch.full((b,), distilled_scale, device=x.device, dtype=torch.float32)
        tokens = x.to(dt).reshape(b, c, h * w).permute(0, 2, 1)
        out = self.transformer(
            hidden_states=tokens, encoder_hidden_states=states,
            timestep=torch.full((b,), sigma, device=x.device, dtype=dt), img_ids=latent_ids(h, w, x.device),
            txt_ids=text_ids(states.shape[1], x.device), guidance=guidance, return_dict=False)[0]
        return out.permute(0, 2, 1).reshape(b, c, h, w).to(x.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        mean, std = bn_stats(vae)
        z = latents.to(vae.dtype) * std.to(vae.dtype) + mean.to(vae.dtype)
        img = vae.decode(unpatchify(z), return_dict=False)[0]
        return (img.float() * 0.5 + 0.5).clamp(0, 1)

    def pipeline(self, scheduler=None):
        from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline

        scheduler = scheduler or FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
        return Flux2KleinPipeline(transformer=self.transformer, vae=self.vae, scheduler=scheduler,
                                  **self._pipeline_components())

    # -------------------------------------------------------------------------------------------- constructors
    @classmethod
    def from_pipeline(cls, pipe, **kw) -> "Flux2Backbone":
        text = text_encoder_for(cls.__name__, pipe.text_encoder is not None,
                                lambda: Qwen3TextEncoder(pipe.tokenizer, pipe.text_encoder))
        return cls(pipe.transformer, pipe.vae, text, **kw)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype=torch.float32, device="cpu",
                        local_files_only: bool = True, text_encoders: bool = True, **kw) -> "Flux2Backbone":
        """`text_encoders=False` loads neither Qwen3 nor its tokenizer."""
        from diffusers import Flux2KleinPipeline

        cfg = check_pipeline_source(path, PIPELINE_CLASSES, cls.name, local_files_only)
        if cfg.get("is_distilled"):
            raise ValueError(f"{path!r} is a step-distilled FLUX.2-Klein (is_distilled=true); reward "
                             "backpropagation with true CFG expects the base model (FLUX.2-klein-base-*)")
        pipe = Flux2KleinPipeline.from_pretrained(str(path), dtype=resolve_dtype(dtype),
                                                  local_files_only=local_files_only,
                                                  **text_components(TEXT_COMPONENTS, text_encoders))
        return cls.from_pipeline(pipe.to(device), **{**saved_settings(path), **kw})

    @classmethod
    def tiny(cls, seed: int = 0, *, dtype=torch.float32, device="cpu", text_encoders: bool = True,
             **kw) -> "Flux2Backbone":
        """Random tiny FLUX.2-Klein (1+1 blocks, 32 px, 28-layer 16-wide Qwen3 so layers 9/18/27 exist).
        `text_encoders=False` builds no text encoder; the transformer and VAE are the same either way."""
        from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel

        torch.manual_seed(seed)
        transformer = Flux2Transformer2DModel(**TINY_TRANSFORMER)
        vae = AutoencoderKLFlux2(**TINY_VAE)
        # non-trivial batch-norm statistics, so that tests see the un-normalisation in decode
        g = torch.Generator().manual_seed(seed)
        vae.bn.running_mean.copy_(0.1 * torch.randn(vae.bn.running_mean.shape, generator=g))
        vae.bn.running_var.copy_(0.5 + torch.rand(vae.bn.running_var.shape, generator=g))
        text = text_encoder_for(cls.__name__, text_encoders, _tiny_text, seed=seed + 1)
        kw.setdefault("preset", BackbonePreset("flux2", 25, PRESET.guidance, TINY_RESOLUTION))
        bb = cls(transformer, vae, text, **kw)
        return bb.to(device).cast(resolve_dtype(dtype))


def _tiny_text() -> Qwen3TextEncoder:
    """A tiny random Qwen3 (28 layers of width 16, so that the layers the pipeline reads exist)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok = tiny_qwen_tokenizer(TINY_TEXT_LEN)
    qwen = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tok), hidden_size=TINY_QWEN_HIDDEN, intermediate_size=32, num_hidden_layers=28,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=2 * TINY_TEXT_LEN,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True))
    return Qwen3TextEncoder(tok, qwen, max_sequence_length=TINY_TEXT_LEN)
