"""The world's preference model (its PickScore): a prompt-conditioned image score learned only from pairwise choices.

    s(image, prompt) = head([h, h * t])      h = CNN(image) [256],  t = W e(prompt) + U [a_1 .. a_Q] [256]

`h` comes from the recogniser's convolutional trunk (initialised from the committed recogniser, as PickScore starts
from CLIP, then trained), `e` is the frozen MiniLM sentence embedding and a_q = softmax(S k_q) S reads the prompt's
token states S [16, 384] through Q learned queries: the mean-pooled embedding barely tells "a red circle and a blue
square" from "a blue circle and a red square" (cosine 0.996), the token states do. Training (train_preference.py)
sees only comparisons "image a is preferred to image b for this prompt" (or neither: a tie), labelled by the
rater, through the Bradley-Terry loss -log sigmoid(s_a - s_b) (a tie's: half of it each way round): the score's
scale is logits of a choice, its offset is arbitrary.
Registered as the reward "world_preference" (differentiable in the pixels; frozen weights).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from flowbp_core.world.assets import ASSETS_DIR, load_checkpoint
from flowbp_core.world.recogniser import Recogniser, RecogniserConfig

PREFERENCE_CHECKPOINT = ASSETS_DIR / "preference" / "preference.safetensors"
PREFERENCE_REGENERATE = ("python -m services.entrypoints.world.train_preference --out /tmp/world_pref && "
                         "python -m services.entrypoints.world.publish preference /tmp/world_pref")
TEXT_DIM = 384  # MiniLM's pooled embedding


@dataclass(frozen=True, kw_only=True)
class PreferenceConfig:
    """Shape of the preference model.

    Attributes:
        width: channels of the first convolutions (the recogniser trunk's; 32 loads the committed recogniser).
        feature: image feature size h (the trunk's output).
        hidden: width of the head's hidden layer.
        token_queries: Q, learned queries that read the prompt's token states (0: the pooled embedding alone).
    """

    width: int = 32
    feature: int = 256
    hidden: int = 128
    token_queries: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


class PreferenceModel(nn.Module):
    def __init__(self, cfg: PreferenceConfig = PreferenceConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        trunk = Recogniser(RecogniserConfig(width=cfg.width, feature=cfg.feature))
        self.body, self.fc = trunk.body, trunk.fc
        self.text = nn.Linear(TEXT_DIM, cfg.feature)
        if cfg.token_queries:
            self.queries = nn.Parameter(torch.randn(cfg.token_queries, TEXT_DIM) / TEXT_DIM**0.5)
            # zero-initialised: a model grown from a pooled-only checkpoint starts with that checkpoint's scores
            self.tokens = nn.Linear(cfg.token_queries * TEXT_DIM, cfg.feature)
            nn.init.zeros_(self.tokens.weight)
            nn.init.zeros_(self.tokens.bias)
        self.head = nn.Sequential(nn.Linear(2 * cfg.feature, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, 1))

    def init_from_recogniser(self, recogniser: Recogniser) -> None:
        """Start the image trunk from a trained recogniser (it already sees shapes, colours and counts)."""
        self.body.load_state_dict(recogniser.body.state_dict())
        self.fc.load_state_dict(recogniser.fc.state_dict())

    def forward(self, images: Tensor, text: dict[str, Tensor]) -> Tensor:
        """images [B, 3, 32, 32] in [0, 1], text the MiniLM encoder's output for the B prompts (pooled [B, 384],
        token states [B, 16, 384]) -> scores [B]."""
        h = self.fc(self.body(images * 2.0 - 1.0))
        t = self.text(text["pooled_prompt_embeds"])
        if self.cfg.token_queries:
            states = text["prompt_embeds"]
            weights = torch.softmax(torch.einsum("btd,qd->bqt", states, self.queries) / TEXT_DIM**0.5, dim=-1)
            t = t + self.tokens(torch.einsum("bqt,btd->bqd", weights, states).flatten(1))
        return self.head(torch.cat([h, h * t], dim=1)).squeeze(1)


def bradley_terry_loss(scores_a: Tensor, scores_b: Tensor) -> Tensor:
    """Mean -log P(a preferred to b) = -log sigmoid(s_a - s_b), for pairs where a was chosen."""
    return nn.functional.softplus(scores_b - scores_a).mean()


def tie_loss(scores_a: Tensor, scores_b: Tensor) -> Tensor:
    """Mean Bradley-Terry loss of a tie, -log sqrt(P(a over b) P(b over a)): least when s_a = s_b.

    The rater's size and light scores saturate and every broken prompt rates 0, so ties say where taste stops:
    without them the model extrapolates "bigger is better" past the rater's targets and among broken images."""
    d = scores_a - scores_b
    return 0.5 * (nn.functional.softplus(d) + nn.functional.softplus(-d)).mean() - math.log(2.0)


def load_preference(path: Path | None = None, token_queries: int | None = None) -> tuple[PreferenceModel, dict]:
    """The checkpoint's model (frozen, eval mode) and metadata; `token_queries` grows a pooled-only checkpoint by
    that many zero-initialised token queries (the scores stay the checkpoint's until it trains further)."""
    tensors, meta = load_checkpoint(Path(path or PREFERENCE_CHECKPOINT), regenerate=PREFERENCE_REGENERATE)
    cfg = PreferenceConfig(**meta["config"].get("model", {}))
    grow = token_queries is not None and token_queries != cfg.token_queries
    if grow and cfg.token_queries:
        raise ValueError(f"load_preference: {path} already reads its prompt through {cfg.token_queries} token "
                         f"queries; it cannot be grown to {token_queries}")
    model = PreferenceModel(replace(cfg, token_queries=token_queries) if grow else cfg)
    loaded = model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=not grow)
    if set(loaded.missing_keys) - {"queries", "tokens.weight", "tokens.bias"} or loaded.unexpected_keys:
        raise ValueError(f"load_preference: {path}: tensors missing {loaded.missing_keys}, unexpected "
                         f"{loaded.unexpected_keys} for {cfg}")
    return model.eval().requires_grad_(False), meta


class WorldPreferenceReward(nn.Module):
    """Reward protocol: `__call__(images [B, 3, 32, 32] in [0, 1], prompts) -> Tensor[B]`, differentiable in images.

    The score is the preference model's logit (higher is preferred; only differences between images mean
    anything). Frozen: its weights never train."""

    name = "world_preference"

    def __init__(self, checkpoint: str | Path | None = None) -> None:
        super().__init__()
        from flowbp_core.world.text import shared_encoder

        self.model, self.meta = load_preference(Path(checkpoint) if checkpoint else None)
        self.encoder = shared_encoder()

    def train(self, mode: bool = True) -> "WorldPreferenceReward":  # noqa: ARG002 - always frozen
        return super().train(False)

    def forward(self, images: Tensor, prompts: list[str]) -> Tensor:
        channels = self.model.body[0].in_channels
        if images.ndim != 4 or images.shape[1] != channels or tuple(images.shape[2:]) != (32, 32):
            raise ValueError(f"world_preference: images must be [B, 3, 32, 32] in [0, 1], got {tuple(images.shape)}")
        if isinstance(prompts, str) or len(prompts) != images.shape[0] or not len(prompts):
            raise ValueError(f"world_preference: {images.shape[0]} images but {len(prompts)} prompts; expected one "
                             "prompt per image and at least one")
        with torch.no_grad():  # non-finite pixels pass: the training step's own check skips such a step
            finite = images[torch.isfinite(images)]
            lo, hi = (float(finite.min()), float(finite.max())) if finite.numel() else (0.0, 1.0)
        if not (-0.01 <= lo and hi <= 1.01):
            raise ValueError(f"world_preference: image values must lie in [0, 1], got [{lo:.3f}, {hi:.3f}]")
        text = {k: v.to(images.device, torch.float32) for k, v in self.encoder.encode(list(prompts)).items()}
        return self.model(images.float(), text)


__all__ = ["PreferenceConfig", "PreferenceModel", "WorldPreferenceReward", "bradley_terry_loss", "load_preference",
           "tie_loss", "PREFERENCE_CHECKPOINT"]
