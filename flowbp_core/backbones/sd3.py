"""SD3 / SD3.5 adapter: `SD3Transformer2DModel` + `AutoencoderKL` + CLIP-L/CLIP-G/T5.

Conventions (algorithms.md 4): static shift schedule (3.0 for SD3.5), timestep = 1000 sigma, true CFG 3.5 with
an empty negative prompt whose branch is detached, decode = VAE(latents / scaling + shift) * 0.5 + 0.5.

The constructor takes modules, not a folder, so the embedded backbone can reuse this adapter with its own
in-memory transformer, `vae=None` (pixel space: latents are images in [-1, 1]) and any text encoder with
`encode(prompts) -> (states, pooled)`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch

from flowbp_core.backbones.adapter import (DiffusersBackbone, check_pipeline_source, saved_settings, text_components,
                                           text_encoder_for)
from flowbp_core.backbones.base import BackbonePreset, TextEncoder, register
from flowbp_core.backbones.text import SD3TextEncoder, tiny_clip_tokenizer, tiny_t5_tokenizer
from flowbp_core.dtypes import resolve_dtype
from flowbp_core.guidance import GuidanceConfig
from flowbp_core.schedules import Schedule, make_schedule

PRESET = BackbonePreset(method_preset="sd35", n_steps=25, guidance=GuidanceConfig("true", 3.5, True), resolution=512)
PIPELINE_CLASSES = ("StableDiffusion3Pipeline",)
TEXT_COMPONENTS = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2", "tokenizer_3", "text_encoder_3")

# SD3.5-Medium (2.24 B parameters) and the SD3 VAE: the real sizes, for benchmarks with random weights.
REAL_TRANSFORMER = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                        pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
                        dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
REAL_VAE = dict(in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=2, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
                scaling_factor=1.5305, shift_factor=0.0609)
REAL_TEXT = dict(seq_len=77 + 256, dim=4096, pooled_dim=2048)  # CLIP tokens + T5 tokens, as the pipeline builds

TINY_RESOLUTION = 32
TINY_TRANSFORMER = dict(sample_size=16, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8,
                        num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32,
                        pooled_projection_dim=64, out_channels=16, pos_embed_max_size=32,
                        dual_attention_layers=(0,), qk_norm="rms_norm")
TINY_VAE = dict(in_channels=3, out_channels=3, block_out_channels=(8, 16),
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                layers_per_block=1, latent_channels=16, norm_num_groups=4, sample_size=TINY_RESOLUTION,
                use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609)
TINY_TEXT_LEN = 16


def vae_scale_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1


def load_vae_decoder(path: str | os.PathLike, *, dtype=torch.float32, device="cpu",
                     local_files_only: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
    """`decode_latents` with the VAE of a pipeline folder, loaded alone (a reward replica decodes, nothing else)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(path), subfolder="vae", torch_dtype=resolve_dtype(dtype),
                                        local_files_only=local_files_only).to(device)
    vae.requires_grad_(False)
    return functools.partial(decode_latents, vae)


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """latents / scaling_factor + shift_factor -> VAE -> [0, 1], differentiable (the clamp is the reference's)."""
    if vae is None:  # pixel-space model: the latent is the image in [-1, 1]
        return (latents.float() * 0.5 + 0.5).clamp(0, 1)
    cfg = vae.config
    z = latents.to(vae.dtype) / cfg.scaling_factor + (cfg.shift_factor or 0.0)
    img = vae.decode(z, return_dict=False)[0]
    return (img.float() * 0.5 + 0.5).clamp(0, 1)


@register("sd3")
class SD3Backbone(DiffusersBackbone):
    name = "sd3"
    pipeline_class_name = "StableDiffusion3Pipeline"
    default_lora_targets = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                            "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")
    supports_distilled_guidance = False

    def __init__(self, transformer, vae, text_encoder: TextEncoder, *, shift: float = 3.0,
                 preset: BackbonePreset = PRESET, negative_prompt: str = "", **common):
        super().__init__(transformer, vae, text_encoder, preset=preset, negative_prompt=negative_prompt, **common)
        self.shift = float(shift)

    # -------------------------------------------------------------------------------------------- family hooks
    @property
    def size_multiple(self) -> int:
        return vae_scale_factor(self.vae) * self.transformer.config.patch_size

    def latent_shape(self, batch: int) -> tuple[int, ...]:
        h, w = self._latent_hw(vae_scale_factor(self.vae))
        return (batch, self.transformer.config.in_channels, h, w)

    def schedule(self, n_steps: int | None = None) -> Schedule:
        return make_schedule("sd3", n_steps or self.preset.n_steps, shift=self.shift)

    def eval_schedule(self, n_steps: int | None = None) -> Schedule:
        """The SD3 pipeline's own spacing, which the reference evaluates SD3.5 with (training passes linspace)."""
        return make_schedule("sd3_pipeline", n_steps or self.preset.n_steps, shift=self.shift)

    def _forward(self, x, sigma, states, pooled, distilled_scale):
        if pooled is None:
            raise ValueError("SD3 needs a pooled text embedding: its text encoder returned pooled=None")
        t = torch.full((x.shape[0],), sigma * 1000.0, device=x.device, dtype=torch.float32)
        out = self.transformer(hidden_states=self._model_input(x), encoder_hidden_states=states,
                               pooled_projections=pooled, timestep=t, return_dict=False)[0]
        return out.to(x.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return decode_latents(self.vae, latents)

    def pipeline(self, scheduler=None):
        from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

        comps = self._pipeline_components()
        return StableDiffusion3Pipeline(transformer=self.transformer, vae=self.vae,
                                        scheduler=scheduler or FlowMatchEulerDiscreteScheduler(shift=self.shift),
                                        **comps)

    # -------------------------------------------------------------------------------------------- constructors
    @classmethod
    def from_pipeline(cls, pipe, **kw) -> "SD3Backbone":
        """The backbone over `pipe`'s modules; a pipeline loaded without text encoders gives one that cannot encode
        (a learner's: its conditioning comes in the caches)."""
        text = text_encoder_for(cls.__name__, pipe.text_encoder is not None, lambda: SD3TextEncoder(
            pipe.tokenizer, pipe.text_encoder, pipe.tokenizer_2, pipe.text_encoder_2, pipe.tokenizer_3,
            pipe.text_encoder_3, joint_attention_dim=pipe.transformer.config.joint_attention_dim))
        kw.setdefault("shift", float(pipe.scheduler.config.get("shift", 3.0)))
        return cls(pipe.transformer, pipe.vae, text, **kw)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype=torch.float32, device="cpu",
                        local_files_only: bool = True, text_encoders: bool = True, **kw) -> "SD3Backbone":
        """`text_encoders=False` loads neither the CLIPs nor T5 (nor their tokenizers)."""
        from diffusers import StableDiffusion3Pipeline

        check_pipeline_source(path, PIPELINE_CLASSES, cls.name, local_files_only)
        pipe = StableDiffusion3Pipeline.from_pretrained(str(path), dtype=resolve_dtype(dtype),
                                                        local_files_only=local_files_only,
                                                        **text_components(TEXT_COMPONENTS, text_encoders))
        return cls.from_pipeline(pipe.to(device), **{**saved_settings(path), **kw})

    @classmethod
    def vae_decoder(cls, path: str | os.PathLike, *, dtype=torch.float32, device="cpu",
                    local_files_only: bool = True, **_) -> Callable[[torch.Tensor], torch.Tensor]:
        """`decode` from the folder's VAE alone: no transformer, no text encoders."""
        check_pipeline_source(path, PIPELINE_CLASSES, cls.name, local_files_only)
        return load_vae_decoder(path, dtype=dtype, device=device, local_files_only=local_files_only)

    @classmethod
    def tiny(cls, seed: int = 0, *, dtype=torch.float32, device="cpu", with_t5: bool = True,
             text_encoders: bool = True, **kw) -> "SD3Backbone":
        """Random tiny SD3 (2 layers, 32 px, 16-token prompts) with real tokenizers built in code.
        `text_encoders=False` builds no text encoder; the transformer and VAE are the same either way."""
        from diffusers import AutoencoderKL, SD3Transformer2DModel

        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(**TINY_TRANSFORMER)
        vae = AutoencoderKL(**TINY_VAE)
        text = text_encoder_for(cls.__name__, text_encoders, lambda: _tiny_text(with_t5), seed=seed + 1)
        kw.setdefault("preset", BackbonePreset("sd35", 25, PRESET.guidance, TINY_RESOLUTION))
        bb = cls(transformer, vae, text, **kw)
        return bb.to(device).cast(resolve_dtype(dtype))


def _tiny_text(with_t5: bool) -> SD3TextEncoder:
    """Tiny random CLIP-L, CLIP-G and (with_t5) T5 of the tiny transformer's widths."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    tok_l, tok_g = tiny_clip_tokenizer(TINY_TEXT_LEN), tiny_clip_tokenizer(TINY_TEXT_LEN)
    eos = tok_l.convert_tokens_to_ids("<|endoftext|>")
    bos = tok_l.convert_tokens_to_ids("<|startoftext|>")

    def clip():
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tok_l), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=TINY_TEXT_LEN, projection_dim=32,
            bos_token_id=bos, eos_token_id=eos, pad_token_id=eos))

    tok_t5 = tiny_t5_tokenizer(TINY_TEXT_LEN)
    t5 = T5EncoderModel(T5Config(vocab_size=len(tok_t5), d_model=32, d_ff=64, d_kv=8, num_layers=1,
                                 num_heads=4, relative_attention_num_buckets=8, pad_token_id=0,
                                 eos_token_id=1, decoder_start_token_id=0)) if with_t5 else None
    return SD3TextEncoder(tok_l, clip(), tok_g, clip(), tok_t5 if with_t5 else None, t5,
                          joint_attention_dim=TINY_TRANSFORMER["joint_attention_dim"],
                          max_sequence_length=TINY_TEXT_LEN)
