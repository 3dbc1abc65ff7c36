"""The embedded base model: a small diffusers SD3Transformer2DModel in pixel space (32x32x3), MiniLM-conditioned.

Conventions (the same as SD3's and algorithms.md's): x = 2 * image - 1; x_sigma = (1 - sigma) x + sigma * noise;
the model predicts v = noise - x at timestep 1000 * sigma; sampling runs sigma from 1 to 0 with
z_{i+1} = z_i + (sigma_{i+1} - sigma_i) v_i. Sampling and guidance live in `EmbeddedBackbone` (true CFG against
the empty prompt, which the training dropped 10 % of the time).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from flowbp_core.world.assets import ASSETS_DIR, load_checkpoint

BASE_CHECKPOINT = ASSETS_DIR / "base" / "transformer.safetensors"
# 30 minutes on 2 CPU cores; the committed base was trained on a GPU by the command its metadata records (add
# --device cuda --workers 6 --batch 1024 --lr 1.5e-3 --ema 0.999 --minutes 4, see flowbp_core/world/README.md)
BASE_REGENERATE = ("python -m services.entrypoints.world.train_base --out /tmp/world_base && "
                   "python -m services.entrypoints.world.publish base /tmp/world_base")


@dataclass(frozen=True)
class BaseModelConfig:
    sample_size: int = 32
    patch_size: int = 4
    in_channels: int = 3
    out_channels: int = 3
    num_layers: int = 6
    attention_head_dim: int = 64
    num_attention_heads: int = 4
    joint_attention_dim: int = 384  # MiniLM hidden size
    pooled_projection_dim: int = 384
    pos_embed_max_size: int = 8  # 32 / patch 4

    @property
    def caption_projection_dim(self) -> int:
        # SD3's joint blocks run text and image streams at the same width.
        return self.attention_head_dim * self.num_attention_heads

    def diffusers_kwargs(self) -> dict:
        d = asdict(self)
        d["caption_projection_dim"] = self.caption_projection_dim
        return d


def build_transformer(cfg: BaseModelConfig):
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(**cfg.diffusers_kwargs())


def load_base_transformer(path: Path | None = None, dtype: torch.dtype = torch.float32):
    """The committed (EMA) base transformer, verified against its recorded hashes, in eval mode."""
    tensors, meta = load_checkpoint(Path(path or BASE_CHECKPOINT), regenerate=BASE_REGENERATE)
    model_cfg = meta["config"].get("model", meta["config"])
    cfg = BaseModelConfig(**{k: v for k, v in model_cfg.items() if k in BaseModelConfig.__dataclass_fields__})
    model = build_transformer(cfg)
    model.load_state_dict({k: v.to(torch.float32) for k, v in tensors.items()}, strict=True)
    if dtype != torch.float32:  # diffusers warns on every cast, even a no-op one
        model = model.to(dtype)
    return model.eval(), meta
