"""Frozen text encoders of the three families, each behind the same `encode(prompts) -> (states, pooled)`.

The tokenisation and layer choices follow the diffusers pipelines exactly (tests compare against
`pipeline.encode_prompt`), because a prompt embedding that differs from the one the model was trained with is a
silent quality loss nobody notices. Also here: small tokenizers built in code, for tiny test models (no hub).
"""

from __future__ import annotations

import torch

# ------------------------------------------------------------------------------------------------ helpers


def _device_dtype(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(module.parameters())
    return p.device, p.dtype


def _max_len(tokenizer, default: int) -> int:
    """The pipelines' sequence length, capped by what the tokenizer (and so a tiny encoder) allows."""
    m = getattr(tokenizer, "model_max_length", None)
    return default if m is None or m <= 0 else min(default, int(m))


def _clip_states(tokenizer, encoder, prompts: list[str], max_length: int):
    ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                    return_tensors="pt").input_ids
    dev, _ = _device_dtype(encoder)
    return encoder(ids.to(dev), output_hidden_states=True)


def _t5_states(tokenizer, encoder, prompts: list[str], max_length: int) -> torch.Tensor:
    ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                    add_special_tokens=True, return_tensors="pt").input_ids
    dev, _ = _device_dtype(encoder)
    return encoder(ids.to(dev))[0]


# ------------------------------------------------------------------------------------------------ encoders


class SD3TextEncoder:
    """CLIP-L + CLIP-G (penultimate hidden states, projected pooled) + T5, as StableDiffusion3Pipeline does:
    states = [pad(CLIP-L | CLIP-G) ; T5] along the sequence, pooled = [pooled-L | pooled-G]. Without T5 the
    T5 part is zeros of the transformer's joint_attention_dim (the pipeline's behaviour)."""

    def __init__(self, tokenizer, text_encoder, tokenizer_2, text_encoder_2, tokenizer_3=None, text_encoder_3=None,
                 *, joint_attention_dim: int, max_sequence_length: int = 256):
        self.tokenizer, self.text_encoder = tokenizer, text_encoder.eval().requires_grad_(False)
        self.tokenizer_2, self.text_encoder_2 = tokenizer_2, text_encoder_2.eval().requires_grad_(False)
        self.tokenizer_3 = tokenizer_3
        self.text_encoder_3 = None if text_encoder_3 is None else text_encoder_3.eval().requires_grad_(False)
        self.joint_attention_dim = int(joint_attention_dim)
        self.max_sequence_length = max_sequence_length

    def components(self) -> dict:
        return dict(tokenizer=self.tokenizer, text_encoder=self.text_encoder, tokenizer_2=self.tokenizer_2,
                    text_encoder_2=self.text_encoder_2, tokenizer_3=self.tokenizer_3,
                    text_encoder_3=self.text_encoder_3)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        clip_len = _max_len(self.tokenizer, 77)
        outs = [_clip_states(tok, enc, prompts, clip_len)
                for tok, enc in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2))]
        dev, dtype = _device_dtype(self.text_encoder)
        clip_states = torch.cat([o.hidden_states[-2].to(dtype) for o in outs], dim=-1)
        pooled = torch.cat([o[0].to(dtype) for o in outs], dim=-1)
        if self.text_encoder_3 is None:
            t5 = torch.zeros(len(prompts), self.max_sequence_length, self.joint_attention_dim, device=dev, dtype=dtype)
        else:
            t5 = _t5_states(self.tokenizer_3, self.text_encoder_3, prompts,
                            _max_len(self.tokenizer_3, self.max_sequence_length))
            dtype = t5.dtype
        clip_states = torch.nn.functional.pad(clip_states, (0, t5.shape[-1] - clip_states.shape[-1]))
        return torch.cat([clip_states.to(dtype), t5.to(clip_states.device)], dim=-2), pooled


class Flux1TextEncoder:
    """FLUX.1: CLIP-L pooler output (pooled) + T5 last hidden state (tokens, 512 by default)."""

    def __init__(self, tokenizer, text_encoder, tokenizer_2, text_encoder_2, *, max_sequence_length: int = 512):
        self.tokenizer, self.text_encoder = tokenizer, text_encoder.eval().requires_grad_(False)
        self.tokenizer_2, self.text_encoder_2 = tokenizer_2, text_encoder_2.eval().requires_grad_(False)
        self.max_sequence_length = max_sequence_length

    def components(self) -> dict:
        return dict(tokenizer=self.tokenizer, text_encoder=self.text_encoder, tokenizer_2=self.tokenizer_2,
                    text_encoder_2=self.text_encoder_2)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.tokenizer(prompts, padding="max_length", max_length=_max_len(self.tokenizer, 77),
                             truncation=True, return_tensors="pt").input_ids
        dev, dtype = _device_dtype(self.text_encoder)
        pooled = self.text_encoder(ids.to(dev), output_hidden_states=False).pooler_output.to(dtype)
        states = _t5_states(self.tokenizer_2, self.text_encoder_2, prompts,
                            _max_len(self.tokenizer_2, self.max_sequence_length))
        return states, pooled


class Qwen3TextEncoder:
    """FLUX.2-Klein: the chat-templated prompt through Qwen3, hidden states of layers (9, 18, 27) stacked along
    the feature axis (so joint_attention_dim = 3 x hidden). No pooled vector."""

    def __init__(self, tokenizer, text_encoder, *, max_sequence_length: int = 512,
                 hidden_states_layers: tuple[int, ...] = (9, 18, 27)):
        self.tokenizer, self.text_encoder = tokenizer, text_encoder.eval().requires_grad_(False)
        self.max_sequence_length = max_sequence_length
        self.hidden_states_layers = tuple(hidden_states_layers)
        n = text_encoder.config.num_hidden_layers
        if max(self.hidden_states_layers) > n:
            raise ValueError(f"hidden_states_layers={self.hidden_states_layers} needs a text encoder with at least "
                             f"{max(self.hidden_states_layers)} layers; this one has {n}")

    def components(self) -> dict:
        return dict(tokenizer=self.tokenizer, text_encoder=self.text_encoder)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, None]:
        texts = [self.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                    add_generation_prompt=True, enable_thinking=False)
                 for p in prompts]
        inputs = self.tokenizer(texts, return_tensors="pt", padding="max_length", truncation=True,
                                max_length=_max_len(self.tokenizer, self.max_sequence_length))
        dev, dtype = _device_dtype(self.text_encoder)
        out = self.text_encoder(input_ids=inputs["input_ids"].to(dev), attention_mask=inputs["attention_mask"].to(dev),
                                output_hidden_states=True, use_cache=False)
        h = torch.stack([out.hidden_states[k] for k in self.hidden_states_layers], dim=1).to(dtype)
        b, c, t, d = h.shape
        return h.permute(0, 2, 1, 3).reshape(b, t, c * d), None


# ------------------------------------------------------------------------------------------ tiny tokenizers


def _byte_chars() -> list[str]:
    from tokenizers.pre_tokenizers import ByteLevel

    return list(ByteLevel.alphabet())


def tiny_clip_tokenizer(model_max_length: int = 16):
    """A CLIP BPE tokenizer with the 256 byte-level characters (and their word-final forms), no merges."""
    from transformers import CLIPTokenizer

    chars = sorted(_byte_chars())
    vocab = {c: i for i, c in enumerate(chars)}
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


def tiny_t5_tokenizer(model_max_length: int = 16):
    """A T5 unigram tokenizer over lowercase letters, digits and basic punctuation."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(c, -2.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789.,!?-'"]
    pieces += [("\u2581" + c, -1.5) for c in "abcdefghijklmnopqrstuvwxyz"]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


# Qwen3's chat template reduced to what `apply_chat_template(..., add_generation_prompt=True,
# enable_thinking=False)` produces for one user turn, so tiny and real models see the same framing.
QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def tiny_qwen_tokenizer(model_max_length: int = 32):
    """A byte-level Qwen2 tokenizer (no merges) with Qwen's special tokens and chat template."""
    from transformers import Qwen2TokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(_byte_chars()))}
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    for s in specials:
        vocab[s] = len(vocab)
    tok = Qwen2TokenizerFast(vocab=vocab, merges=[], model_max_length=model_max_length,
                             chat_template=QWEN_CHAT_TEMPLATE)
    tok.add_special_tokens({"additional_special_tokens": specials[1:]})
    return tok
