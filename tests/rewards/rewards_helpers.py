"""Tiny real models for the reward tests: built from configs, saved to temp folders, loaded back offline.

Everything here is a real transformers model (random weights) and a real tokenizer built in code, so the loaders
under test run exactly as they would on a downloaded checkpoint.
"""

from __future__ import annotations

import os
import string

import numpy as np
import torch

TINY_IMAGE = 32  # CLIP/BLIP tiny vision towers take 32 x 32 inputs (patch 8)


def sample_image_path() -> str:
    """A real photograph shipped with matplotlib (Grace Hopper, 512 x 600): real-looking pixels offline."""
    import matplotlib

    return os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "sample_data", "grace_hopper.jpg")


def load_sample_image() -> torch.Tensor:
    """[1,3,600,512] float in [0,1]."""
    from PIL import Image

    arr = np.array(Image.open(sample_image_path()).convert("RGB"))
    return torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 255.0


def clip_tokenizer():
    from transformers import CLIPTokenizer

    chars = list(string.ascii_lowercase + string.digits + ".,!-'")
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)  # the last id, as in OpenAI's BPE (OpenCLIP pools at argmax)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)


def tiny_clip_config(vocab_size: int, eos: int, projection_dim: int = 16):
    from transformers import CLIPConfig

    text = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=16, hidden_act="gelu", eos_token_id=eos,
                bos_token_id=eos - 1, pad_token_id=eos, projection_dim=projection_dim)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=TINY_IMAGE, patch_size=8, hidden_act="gelu", projection_dim=projection_dim)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim,
                      logit_scale_init_value=float(np.log(100.0)))


def clip_processor_config(size: int = TINY_IMAGE) -> dict:
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    proc = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return proc.to_dict()


def make_tiny_clip(seed: int = 0):
    from transformers import CLIPModel

    tok = clip_tokenizer()
    torch.manual_seed(seed)
    model = CLIPModel(tiny_clip_config(len(tok), tok.eos_token_id)).eval()
    return model, tok


def assert_pixel_grad(reward, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """The classic failure is a silent no_grad or a zero-slope clamp: the gradient must reach every image,
    be finite, and not be zero."""
    x = images.clone().requires_grad_(True)
    r = reward(x, prompts)
    assert r.shape == (images.shape[0],), r.shape
    assert r.dtype == torch.float32
    assert torch.isfinite(r).all()
    r.sum().backward()
    assert x.grad is not None, f"{reward.name}: no gradient reached the pixels"
    assert torch.isfinite(x.grad).all(), f"{reward.name}: non-finite pixel gradient"
    per_image = x.grad.flatten(1).abs().sum(1)
    assert (per_image > 0).all(), f"{reward.name}: zero pixel gradient for some image: {per_image}"
    # Frozen: no parameter collected a gradient.
    if isinstance(reward, torch.nn.Module):
        assert all(p.grad is None and not p.requires_grad for p in reward.parameters())
    return r.detach()
