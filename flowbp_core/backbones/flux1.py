"""FLUX.1-dev adapter: `FluxTransformer2DModel` + `AutoencoderKL` (16 channels) + CLIP-L (pooled) + T5 (tokens).

Conventions (algorithms.md 4): the sampler integrates spatial latents [B, 16, H/8, W/8]; `velocity` packs them
into 2x2 patches ([B, H/16 * W/16, 64]) with 2-D `img_ids` (row, column) and zero `txt_ids`, calls the
transformer with timestep = sigma (it multiplies by 1000 itself) and the distilled `guidance` embedding (4.0),
and unpacks. Packing is a permutation, so Euler steps in either layout are identical. Dynamic shift with mu
from the packed image-token count; decode = VAE(latents / 0.3611 + 0.1159) read from the VAE config.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from flowbp_core.backbones.adapter import (DiffusersBackbone, check_pipeline_source, saved_settings, text_components,
                                           text_encoder_for)
from flowbp_core.backbones.base import BackbonePreset, TextEncoder, register
from flowbp_core.backbones.sd3 import decode_latents, load_vae_decoder, vae_scale_factor
from flowbp_core.backbones.text import Flux1TextEncoder, tiny_clip_tokenizer, tiny_t5_tokenizer
from flowbp_core.dtypes import resolve_dtype
from flowbp_core.guidance import GuidanceConfig
from flowbp_core.schedules import (FLUX1_BASE_SEQ, FLUX1_BASE_SHIFT, FLUX1_MAX_SEQ, FLUX1_MAX_SHIFT, Schedule,
                                   base_sigmas, dynamic_shift, flux1_mu)

PRESET = BackbonePreset(method_preset="flux1", n_steps=25, guidance=GuidanceConfig("distilled", 4.0),
                        resolution=512)
PIPELINE_CLASSES = ("FluxPipeline",)
TEXT_COMPONENTS = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")

# FLUX.1-dev (11.9 B parameters) and its VAE: the real sizes, for benchmarks with random weights.
REAL_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                        guidance_embeds=True, axes_dims_rope=(16, 56, 56))
REAL_VAE = dict(in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=2, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
                scaling_factor=0.3611, shift_factor=0.1159)
REAL_TEXT = dict(seq_len=512, dim=4096, pooled_dim=768)

TINY_RESOLUTION = 32
TINY_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
                        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
                        guidance_embeds=True, axes_dims_rope=(4, 6, 6))
TINY_VAE = dict(in_channels=3, out_channels=3, block_out_channels=(8, 16),
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                layers_per_block=1, latent_channels=16, norm_num_groups=4, sample_size=TINY_RESOLUTION,
                use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159)
TINY_TEXT_LEN = 16


def pack(x: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, h/2 * w/2, 4C] (2x2 patches, channel-major inside a patch: FluxPipeline's layout)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, _, d = x.shape
    c = d // 4
    return x.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """(h/2 * w/2, 3) ids: 0, row, column of each packed token."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


@register("flux1")
class Flux1Backbone(DiffusersBackbone):
    name = "flux1"
    pipeline_class_name = "FluxPipeline"
    default_lora_targets = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                            "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")
    supports_distilled_guidance = True

    def __init__(self, transformer, vae, text_encoder: TextEncoder, *, preset: BackbonePreset = PRESET,
                 base_seq_len: int = FLUX1_BASE_SEQ, max_seq_len: int = FLUX1_MAX_SEQ,
                 base_shift: float = FLUX1_BASE_SHIFT, max_shift: float = FLUX1_MAX_SHIFT,
                 negative_prompt: str = "", **common):
        super().__init__(transformer, vae, text_encoder, preset=preset, negative_prompt=negative_prompt, **common)
        self.shift_params = dict(base_seq_len=base_seq_len, max_seq_len=max_seq_len, base_shift=base_shift,
                                 max_shift=max_shift)

    @property
    def size_multiple(self) -> int:
        return vae_scale_factor(self.vae) * 2

    def latent_shape(self, batch: int) -> tuple[int, ...]:
        h, w = self._latent_hw(vae_scale_factor(self.vae))
        return (batch, self.transformer.config.in_channels // 4, h, w)

    def image_seq_len(self) -> int:
        _, _, h, w = self.latent_shape(1)
        return (h // 2) * (w // 2)

    def schedule(self, n_steps: int | None = None) -> Schedule:
        n = n_steps or self.preset.n_steps
        mu = flux1_mu(self.image_seq_len(), **self.shift_params)
        return Schedule(torch.cat([dynamic_shift(base_sigmas(n), mu), torch.zeros(1, dtype=torch.float64)]), 1.0)

    def _forward(self, x, sigma, states, pooled, distilled_scale):
        b, _, h, w = x.shape
        dt = self.dtype
        guidance = None
        if self.transformer.config.guidance_embeds:
            # a guidance-distilled model always takes its embedding; outside "distilled" mode it is 1.0
            g = 1.0 if distilled_scale is None else distilled_scale
            guidance = torch.full((b,), g, device=x.device, dtype=torch.float32)
        out = self.transformer(
            hidden_states=pack(x.to(dt)), encoder_hidden_states=states, pooled_projections=pooled,
            timestep=torch.full((b,), sigma, device=x.device, dtype=dt), img_ids=image_ids(h, w, x.device, dt),
            txt_ids=torch.zeros(states.shape[1], 3, device=x.device, dtype=dt), guidance=guidance,
            return_dict=False)[0]
        return unpack(out, h, w).to(x.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return decode_latents(self.vae, latents)

    def pipeline(self, scheduler=None):
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

        p = self.shift_params
        scheduler = scheduler or FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_image_seq_len=p["base_seq_len"],
            max_image_seq_len=p["max_seq_len"], base_shift=p["base_shift"], max_shift=p["max_shift"])
        return FluxPipeline(transformer=self.transformer, vae=self.vae, scheduler=scheduler,
                            **self._pipeline_components())

    # -------------------------------------------------------------------------------------------- constructors
    @classmethod
    def from_pipeline(cls, pipe, **kw) -> "Flux1Backbone":
        text = text_encoder_for(cls.__name__, pipe.text_encoder is not None, lambda: Flux1TextEncoder(
            pipe.tokenizer, pipe.text_encoder, pipe.tokenizer_2, pipe.text_encoder_2))
        sc = pipe.scheduler.config
        for k, ck in (("base_seq_len", "base_image_seq_len"), ("max_seq_len", "max_image_seq_len"),
                      ("base_shift", "base_shift"), ("max_shift", "max_shift")):
            if sc.get(ck) is not None:
                kw.setdefault(k, sc[ck])
        return cls(pipe.transformer, pipe.vae, text, **kw)

    @classmethod
    def vae_decoder(cls, path: str | os.PathLike, *, dtype=torch.float32, device="cpu",
                    local_files_only: bool = True, **_) -> Callable[[torch.Tensor], torch.Tensor]:
        """`decode` from the folder's VAE alone: no transformer, no text encoders."""
        check_pipeline_source(path, PIPELINE_CLASSES, cls.name, local_files_only)
        return load_vae_decoder(path, dtype=dtype, device=device, local_files_only=local_files_only)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype=torch.float32, device="cpu",
                        local_files_only: bool = True, text_encoders: bool = True, **kw) -> "Flux1Backbone":
        """`text_encoders=False` loads neither CLIP nor T5 (nor their tokenizers)."""
        from diffusers import FluxPipeline

        check_pipeline_source(path, PIPELINE_CLASSES, cls.name, local_files_only)
        pipe = FluxPipeline.from_pretrained(str(path), dtype=resolve_dtype(dtype), local_files_only=local_files_only,
                                            **text_components(TEXT_COMPONENTS, text_encoders))
        return cls.from_pipeline(pipe.to(device), **{**saved_settings(path), **kw})

    @classmethod
    def tiny(cls, seed: int = 0, *, dtype=torch.float32, device="cpu", text_encoders: bool = True,
             **kw) -> "Flux1Backbone":
        """Random tiny FLUX.1 (1 double + 1 single block, 32 px, 16-token prompts), tokenizers built in code.
        `text_encoders=False` builds no text encoder; the transformer and VAE are the same either way."""
        from diffusers import AutoencoderKL, FluxTransformer2DModel

        torch.manual_seed(seed)
        transformer, vae = FluxTransformer2DModel(**TINY_TRANSFORMER), AutoencoderKL(**TINY_VAE)
        text = text_encoder_for(cls.__name__, text_encoders, _tiny_text, seed=seed + 1)
        kw.setdefault("preset", BackbonePreset("flux1", 25, PRESET.guidance, TINY_RESOLUTION))
        bb = cls(transformer, vae, text, **kw)
        return bb.to(device).cast(resolve_dtype(dtype))


def _tiny_text() -> Flux1TextEncoder:
    """Tiny random CLIP-L and T5 of the tiny transformer's widths."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    tok = tiny_clip_tokenizer(TINY_TEXT_LEN)
    eos, bos = tok.convert_tokens_to_ids("<|endoftext|>"), tok.convert_tokens_to_ids("<|startoftext|>")
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=TINY_TRANSFORMER["pooled_projection_dim"], intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=TINY_TEXT_LEN,
        bos_token_id=bos, eos_token_id=eos, pad_token_id=eos))
    tok_t5 = tiny_t5_tokenizer(TINY_TEXT_LEN)
    t5 = T5EncoderModel(T5Config(vocab_size=len(tok_t5), d_model=TINY_TRANSFORMER["joint_attention_dim"],
                                 d_ff=64, d_kv=8, num_layers=1, num_heads=4, relative_attention_num_buckets=8,
                                 pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    return Flux1TextEncoder(tok, clip, tok_t5, t5, max_sequence_length=TINY_TEXT_LEN)
