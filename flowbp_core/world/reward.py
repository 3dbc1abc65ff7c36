"""The world's reward: mean log-probability, under the recogniser, of the attributes the prompt asks for.

    r(image, prompt) = mean_a log p(a | image)  [+ aesthetic_weight * crispness(image)]

Attributes per task: single_object - "at least one <shape>"; two_objects - both shapes present; counting -
"exactly n <colour> <shape>s" and "exactly n <colour> objects"; colours - "at least one <colour> <shape>";
position - that, and "a <colour> <shape> in <region>"; colour_attr - both colour-shape pairs present.
r <= 0, and r = 0 means the recogniser is sure everything asked for is there. The optional aesthetic term
is weight-free: it penalises muddy half-saturated pixels (soft, blended edges), 0 for a crisp image.
Three optional defences against reward hacking: randomised smoothing (`smoothing_sigma`), a contrastive form
(`contrastive_negatives`: log P(prompt | image) against same-task negative prompts) and a low-pass on the pixel
gradient (`gradient_blur`: the value is unchanged). Registered as "world_attributes".
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

from flowbp_core.world.assets import ASSETS_DIR, load_checkpoint
from flowbp_core.world.captions import parse
from flowbp_core.world.data import prompt_pool
from flowbp_core.world.recogniser import COL_IDX, POS_IDX, SHP_IDX, Recogniser, RecogniserConfig, gaussian_blur
from flowbp_core.world.spec import PromptSpec

# bounds of the reward's options (the demo checks its flags against the same numbers before loading anything)
SMOOTHING_SIGMA_MAX = 0.5
CONTRASTIVE_NEGATIVES_MAX = 512
GRADIENT_BLUR_MAX = 4.0

RECOGNISER_CHECKPOINT = ASSETS_DIR / "recogniser" / "recogniser.safetensors"
RECOGNISER_REGENERATE = ("python -m services.entrypoints.world.train_reward --out /tmp/world_rec && "
                         "python -m services.entrypoints.world.publish recogniser /tmp/world_rec")


@lru_cache(maxsize=65536)
def _spec(prompt: str) -> PromptSpec:
    return parse(prompt)


def load_recogniser(path: Path | None = None) -> tuple[Recogniser, dict]:
    tensors, meta = load_checkpoint(Path(path or RECOGNISER_CHECKPOINT), regenerate=RECOGNISER_REGENERATE)
    cfg = RecogniserConfig(**meta["config"].get("model", {}))
    model = Recogniser(cfg)
    model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True)
    return model.eval().requires_grad_(False), meta


def _log_at_least_one(logits: Tensor) -> Tensor:
    return torch.logsumexp(logits[..., 1:], -1) - torch.logsumexp(logits, -1)


def _log_exactly(logits: Tensor, n: int) -> Tensor:
    return torch.log_softmax(logits, -1)[..., n]


def attribute_logprobs(out: dict[str, Tensor], b: int, spec: PromptSpec) -> list[Tensor]:
    """The log-probabilities of each attribute `spec` asks for, for sample b."""
    t, objs = spec.task, spec.objects
    terms: list[Tensor] = []
    if t in ("single_object", "two_objects"):
        for o in objs:
            terms.append(_log_at_least_one(out["shape_count"][b, SHP_IDX[o.shape]]))
    elif t == "counting":
        o = objs[0]
        terms.append(_log_exactly(out["pair_count"][b, COL_IDX[o.colour], SHP_IDX[o.shape]], spec.count))
        terms.append(_log_exactly(out["colour_count"][b, COL_IDX[o.colour]], spec.count))
    elif t in ("colours", "colour_attr", "position"):
        for o in objs:
            ci, si = COL_IDX[o.colour], SHP_IDX[o.shape]
            terms.append(_log_at_least_one(out["pair_count"][b, ci, si]))
            if o.position is not None:
                terms.append(torch.nn.functional.logsigmoid(out["pair_pos"][b, ci, si, POS_IDX[o.position]]))
    else:  # PromptSpec validates task
        raise ValueError(f"task={t!r}")
    return terms


def crispness(images: Tensor) -> Tensor:
    """Weight-free aesthetic term in [-1, 0]: minus the mean of 4c(1-c) over pixels, c = chroma / 0.6 clipped.

    Flat background (c = 0) and solid objects (c >= 1) cost nothing; blurred, blended pixels cost most.
    """
    c = (images.amax(1) - images.amin(1)).div(0.6).clamp(0.0, 1.0)
    return -(4.0 * c * (1.0 - c)).mean(dim=(1, 2))


class WorldAttributeReward(torch.nn.Module):
    """Reward protocol: `__call__(images [B,3,32,32] in [0,1], prompts) -> Tensor[B]`, differentiable in images."""

    name = "world_attributes"

    def __init__(self, checkpoint: str | Path | None = None, aesthetic_weight: float = 0.0,
                 smoothing_sigma: float = 0.0, smoothing_samples: int = 4, contrastive_negatives: int = 0,
                 gradient_blur: float = 0.0) -> None:
        super().__init__()
        if not (0.0 <= float(aesthetic_weight) <= 10.0):
            raise ValueError(f"reward.aesthetic_weight={aesthetic_weight!r}: allowed range is [0, 10]")
        if not (0.0 <= float(smoothing_sigma) <= SMOOTHING_SIGMA_MAX):
            raise ValueError(f"reward.smoothing_sigma={smoothing_sigma!r}: allowed range is [0, {SMOOTHING_SIGMA_MAX}]")
        if not (1 <= int(smoothing_samples) <= 64):
            raise ValueError(f"reward.smoothing_samples={smoothing_samples!r}: allowed range is 1..64")
        if not (0.0 <= float(gradient_blur) <= GRADIENT_BLUR_MAX):
            raise ValueError(f"reward.gradient_blur={gradient_blur!r}: "
                             f"allowed range is [0, {GRADIENT_BLUR_MAX}] pixels")
        if not (0 <= int(contrastive_negatives) <= CONTRASTIVE_NEGATIVES_MAX):
            raise ValueError(f"reward.contrastive_negatives={contrastive_negatives!r}: allowed range is "
                             f"0..{CONTRASTIVE_NEGATIVES_MAX}")
        self.model, self.meta = load_recogniser(Path(checkpoint) if checkpoint else None)
        self.aesthetic_weight, self.gradient_blur = float(aesthetic_weight), float(gradient_blur)
        self.smoothing_sigma, self.smoothing_samples = float(smoothing_sigma), int(smoothing_samples)
        # fixed negatives, the same for every call: training-split prompts, all tasks in equal shares, by task
        self.negatives: dict[str, list[PromptSpec]] = {}
        if contrastive_negatives:
            for it in prompt_pool("train", int(contrastive_negatives), seed=4242, background_prob=0.0):
                self.negatives.setdefault(it.spec.task, []).append(it.spec)

    def train(self, mode: bool = True) -> "WorldAttributeReward":  # noqa: ARG002 - always frozen
        return super().train(False)

    def attributes(self, images: Tensor, prompts: list[str]) -> Tensor:
        x, k = images.float(), 1
        if self.gradient_blur > 0:
            # Low-pass the gradient, not the image: the recogniser reads the true pixels, but the pixel gradient it
            # sends back is blurred (the blur is linear and symmetric, so this is its adjoint), so alignment is
            # pushed only towards changes wider than ~sigma (where an object is, its extent) and never towards the
            # few-pixel textures a CNN's raw input gradient is full of.
            low = gaussian_blur(x, self.gradient_blur)
            x = x.detach() + (low - low.detach())
        if self.smoothing_sigma > 0:
            # Randomised smoothing: E over Gaussian pixel noise. A perturbation that fools the recogniser only in
            # a thin set around the image (a fine texture) earns little under noise. The noise is seeded by the
            # images' contents, so the same batch gets the same reward (a resumed run repeats itself).
            seed = int(x.detach().double().mul(1e4).sum().item()) % (2**62)
            g = torch.Generator(device=x.device).manual_seed(seed)
            k = self.smoothing_samples
            noise = torch.randn((k, *x.shape), generator=g, device=x.device)
            x = (x.unsqueeze(0) + self.smoothing_sigma * noise).flatten(0, 1)
        out = self.model(x)
        specs = [_spec(p) for p in prompts]
        n = len(specs)
        rows = [self._score(out, j * n + b, specs[b]) for j in range(k) for b in range(n)]
        return torch.stack(rows).view(k, n).mean(0)

    def _score(self, out: dict[str, Tensor], i: int, spec: PromptSpec) -> Tensor:
        pos = torch.stack(attribute_logprobs(out, i, spec)).mean()
        negs = [torch.stack(attribute_logprobs(out, i, s)).mean()
                for s in self.negatives.get(spec.task, ()) if s != spec]
        if not negs:
            return pos
        # log P(this prompt | image) among it and the negatives of its task: a change that raises every prompt's
        # score (a background tint or texture the recogniser over-reads) cancels out; only what tells the prompt
        # apart from the others is rewarded. Same task only: "a circle" is not wrong because "a red circle"
        # also holds, but "two red circles" is wrong when "three red circles" holds.
        return pos - torch.logsumexp(torch.stack([pos, *negs]), 0)

    def forward(self, images: Tensor, prompts: list[str]) -> Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"world_attributes: images must be [B,3,H,W], got {tuple(images.shape)}")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"world_attributes: {images.shape[0]} images but {len(prompts)} prompts")
        r = self.attributes(images, list(prompts))
        if self.aesthetic_weight:
            r = r + self.aesthetic_weight * crispness(images.float())
        return r
