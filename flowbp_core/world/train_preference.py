"""Train the world's preference model from pairwise choices labelled by the rater (Bradley-Terry loss):
`train_preference(options)`; the command is `python -m services.entrypoints.world.train_preference` (README.md in
this folder gives the regeneration commands).

Each step shows the model groups of images of one prompt and every pair in a group whose ratings differ by at
least `MIN_MARGIN` points, as "a is preferred to b"; it never sees a rating itself. Groups come from:
- renders: scenes of a training prompt drawn in varied styles (object size, edge width, background tone, a
  little blur and noise), a quarter of them of another prompt of the same task and a fifth with objects grown
  until they merge or leave the frame (prompt-breaking images, which the rater rates 0);
- near misses (`near_miss_groups`): one scene in one style and copies that each break the prompt in one
  attribute (colours swapped, an object recoloured or reshaped, a copy added or dropped, two objects touching);
- the generator's own samples (`pool`, files of `sample_pool --per-prompt K`): the K samples of one prompt
  plus two renders of it, so that the model ranks what alignment will actually show it; pools of a policy
  aligned to an earlier preference model (`sample_pool --policy`) teach it where that policy gamed it.
Validation: pairwise accuracy on held-out prompts' renders (combinations the model never trained on) and on
10 % of each pool's prompts, logged every 50 steps.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from flowbp_core.errors import ConfigError, check_range
from flowbp_core.world.assets import save_checkpoint
from flowbp_core.world.captions import parse
from flowbp_core.world.data import prompt_pool
from flowbp_core.world.preference import PreferenceConfig, PreferenceModel, bradley_terry_loss, tie_loss
from flowbp_core.world.rater import rate_one
from flowbp_core.world.scenes import Scene, render, sample_scene, separated
from flowbp_core.world.spec import BACKGROUNDS, COLOURS, SHAPES, PromptSpec, all_specs
from flowbp_core.world.train_reward import _blur, augment, clock_cosine_lr

MIN_MARGIN = 1.0  # rating points below which a pair is a tie (trained toward equal scores with --tie-weight)
_BG_NAMES = tuple(BACKGROUNDS)


def _objects_in(spec: PromptSpec) -> int:
    return spec.count if spec.task == "counting" else len(spec.objects)


def _crowded(spec: PromptSpec, rng: np.random.Generator, lo: float) -> Scene:
    """A scene of `spec` with objects too large to keep apart: they overlap, merge or leave the frame (what a
    policy that only grows its objects draws; the judge reads no prompt in it, so the rater gives it 0)."""
    base = sample_scene(spec, rng)
    objs = tuple(replace(o, size=float(rng.uniform(lo, lo + 2.0)), x=float(rng.uniform(8, 24)),
                         y=float(rng.uniform(8, 24))) for o in base.objects)
    return replace(base, objects=objs)


def _sized_scene(spec: PromptSpec, rng: np.random.Generator, half_extent: float) -> Scene:
    """A scene of `spec` whose objects' half extent is about `half_extent` px for one object (0.5 px less for each
    further one), or the base data's sizes where objects that large cannot be placed apart."""
    lo = half_extent - 0.5 * (_objects_in(spec) - 1)
    try:
        return sample_scene(spec, rng, size_range=(lo, lo + 0.6))
    except RuntimeError:
        return sample_scene(spec, rng)


def render_styled(spec: PromptSpec, rng: np.random.Generator, asked_background: str | None) -> np.ndarray:
    """One render of `spec` in a random style: object size, edge width and background tone vary; one in five
    has objects grown too large to keep the prompt."""
    if rng.random() < 0.2:
        scene = _crowded(spec, rng, float(rng.uniform(7.0, 11.0)))
    else:
        scene = _sized_scene(spec, rng, float(rng.uniform(3.5, 7.0)))
    edge = float(np.exp(rng.uniform(np.log(0.15), np.log(2.5))))
    if asked_background is not None and rng.random() < 0.9:
        bg = BACKGROUNDS[asked_background]
    elif rng.random() < 0.5:
        bg = BACKGROUNDS[_BG_NAMES[int(rng.integers(len(_BG_NAMES)))]]
    else:
        lum = float(rng.uniform(0.05, 0.95))
        bg = (lum, lum, lum)
    return render(scene, edge=edge, background_rgb=bg)


def render_group(spec: PromptSpec, m: int, rng: np.random.Generator) -> np.ndarray:
    """`m` styled renders for one prompt, about a quarter of another prompt of the same task."""
    others = [s for s in all_specs(spec.task) if s.combination() != spec.combination()]
    out = []
    for _ in range(m):
        drawn = spec if rng.random() >= 0.25 or not others else others[int(rng.integers(len(others)))]
        out.append(render_styled(drawn, rng, spec.background))
    return np.stack(out)


def matched_group(spec: PromptSpec, m: int, rng: np.random.Generator, factor: str | None = None) -> np.ndarray:
    """`m` renders of ONE scene of `spec` that differ in one property (`factor`: "edge" width, object "size" or
    background "light", random when None), in increasing order of it: in mixed groups the large global differences
    decide most pairs, so edges are learnt last and least."""
    scene = sample_scene(spec, rng)
    factor = factor or ("edge", "size", "light")[int(rng.integers(3))]
    if factor == "size":
        grown = [replace(scene, objects=tuple(replace(o, size=o.size + d) for o in scene.objects))
                 for d in np.sort(rng.uniform(-0.5, 1.5, m))]
        return np.stack([render(sc) for sc in grown])
    if factor == "light" and spec.background is None:
        return np.stack([render(scene, background_rgb=(v, v, v)) for v in np.sort(rng.uniform(0.3, 0.95, m))])
    widths = np.sort(np.exp(rng.uniform(np.log(0.15), np.log(2.5), m)))
    return np.stack([render(scene, edge=float(w)) for w in widths])


def _mutated(scene: Scene, rng: np.random.Generator) -> Scene | None:
    """`scene` with one attribute changed (colours swapped between two objects, one object recoloured or
    reshaped, a copy added or an object dropped, two objects moved until they touch); None when the drawn change
    does not apply to this scene."""
    objs = list(scene.objects)
    kind = ("swap", "recolour", "reshape", "add", "drop", "touch")[int(rng.integers(6))]
    i = int(rng.integers(len(objs)))
    if kind == "touch":
        if len(objs) < 2:
            return None
        j = (i + 1 + int(rng.integers(len(objs) - 1))) % len(objs)
        # j moves along the line between the centres until the shapes overlap by up to a pixel (one component)
        d = np.array([objs[j].x - objs[i].x, objs[j].y - objs[i].y])
        d = d / max(float(np.linalg.norm(d)), 1e-6) * (objs[i].size + objs[j].size - float(rng.uniform(0.0, 1.0)))
        objs[j] = replace(objs[j], x=objs[i].x + float(d[0]), y=objs[i].y + float(d[1]))
    elif kind == "swap":
        pair = [j for j in range(len(objs)) if objs[j].colour != objs[i].colour]
        if not pair:
            return None
        j = pair[int(rng.integers(len(pair)))]
        objs[i], objs[j] = replace(objs[i], colour=objs[j].colour), replace(objs[j], colour=objs[i].colour)
    elif kind == "recolour":
        options = [c for c in COLOURS if c != objs[i].colour]
        objs[i] = replace(objs[i], colour=options[int(rng.integers(len(options)))])
    elif kind == "reshape":
        options = [s for s in SHAPES if s != objs[i].shape]
        objs[i] = replace(objs[i], shape=options[int(rng.integers(len(options)))])
    elif kind == "drop":
        if len(objs) < 2:
            return None
        del objs[i]
    else:
        lo, hi = objs[i].size + 1.0, scene.size - objs[i].size - 1.0
        for _ in range(50):
            copy = replace(objs[i], x=float(rng.uniform(lo, hi)), y=float(rng.uniform(lo, hi)))
            if all(separated(copy, o) for o in objs):
                objs.append(copy)
                break
        else:
            return None
    return replace(scene, objects=tuple(objs))


def near_miss_group(spec: PromptSpec, m: int, rng: np.random.Generator) -> np.ndarray:
    """One scene of `spec` in one style (size, edge width, background tone) and `m - 1` copies that each break
    the prompt in one attribute: the only difference in the group is whether the prompt holds, so the model
    cannot let a liked style outweigh a broken binding or count (what aligned policies break first)."""
    scene = _sized_scene(spec, rng, float(rng.uniform(4.0, 7.0)))
    edge = float(np.exp(rng.uniform(np.log(0.15), np.log(1.5))))
    light = float(rng.uniform(0.45, 0.95))
    bg = BACKGROUNDS[spec.background] if spec.background is not None else (light, light, light)
    variants = [scene]
    for _ in range(20 * m):
        if len(variants) == m:
            break
        changed = _mutated(scene, rng)
        if changed is not None:
            variants.append(changed)
    return np.stack([render(sc, edge=edge, background_rgb=bg) for sc in variants])


def sharpened(images: np.ndarray, amount: float) -> np.ndarray:
    """Unsharp-masked copies of generated images [K, 3, H, W]: crisper edges on the generator's own drawings (the
    rater labels the pair; the model learns what crisper means on samples, not only on renders)."""
    x = torch.from_numpy(images).float()
    soft = _blur(x, torch.full((len(x),), 1.0))
    return (x + amount * (x - soft)).clamp(0.0, 1.0).numpy()


def judged_pairs(ratings: list[float], offset: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """((winner, loser) pairs, tied pairs) among one group's images, indices shifted by `offset`: a pair rated within
    MIN_MARGIN of each other is a tie, every other pair a choice."""
    choices, ties = [], []
    for i in range(len(ratings)):
        for j in range(i + 1, len(ratings)):
            if abs(ratings[i] - ratings[j]) < MIN_MARGIN:
                ties.append((offset + i, offset + j))
            else:
                choices.append((offset + i, offset + j) if ratings[i] > ratings[j] else (offset + j, offset + i))
    return choices, ties


def _columns(pairs: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    index = torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)
    return index[:, 0], index[:, 1]


class GroupBatch:
    """Images [N, 3, 32, 32] in [0, 1], their prompts (one per image), the (winner, loser) pairs among them and the
    pairs the rater ties."""

    def __init__(self) -> None:
        self.images: list[np.ndarray] = []
        self.prompts: list[str] = []
        self.pairs: list[tuple[int, int]] = []
        self.ties: list[tuple[int, int]] = []

    def add(self, images: np.ndarray, prompt: str, spec: PromptSpec) -> None:
        ratings = [rate_one(img, spec).score for img in images]
        choices, ties = judged_pairs(ratings, len(self.images))
        self.pairs += choices
        self.ties += ties
        self.images += list(images)
        self.prompts += [prompt] * len(images)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return torch.from_numpy(np.stack(self.images)).float(), *_columns(self.pairs)

    def tie_index(self) -> tuple[torch.Tensor, torch.Tensor]:
        return _columns(self.ties)


def load_pool(paths: list[Path], seed: int) -> tuple[list[tuple[str, np.ndarray]], list[tuple[str, np.ndarray]]]:
    """((prompt, images [K, 3, 32, 32]) groups to train on, groups held out): 10 % of each pool's prompts held out."""
    from safetensors import safe_open

    groups: list[tuple[str, np.ndarray]] = []
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"--pool {path}: no such file (make one with python -m "
                                    f"services.entrypoints.world.sample_pool --out {path} --per-prompt 4)")
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            images = f.get_tensor("images").float().numpy() / 255.0
        prompts = json.loads(meta.get("prompts", "[]"))
        k = int(meta.get("per_prompt", "1"))
        if k < 2 or len(prompts) != len(images):
            raise ValueError(f"--pool {path}: needs several samples per prompt (per_prompt={k}, {len(prompts)} prompts "
                             f"for {len(images)} images); make it with sample_pool --per-prompt 4")
        groups += [(prompts[i], images[i : i + k]) for i in range(0, len(images) - k + 1, k)]
    order = np.random.default_rng(seed).permutation(len(groups))
    n_val = max(1, len(groups) // 10)
    return [groups[i] for i in order[n_val:]], [groups[i] for i in order[:n_val]]


def build_batch(rng: np.random.Generator, g: torch.Generator, prompts, n_render: int, pool_groups,
                n_pool: int, n_matched: int = 0, n_near_miss: int = 0) -> GroupBatch:
    batch = GroupBatch()
    for _ in range(n_near_miss):
        it = prompts[int(rng.integers(len(prompts)))]
        batch.add(near_miss_group(it.spec, 4, rng), it.text, it.spec)
    for _ in range(n_render):
        it = prompts[int(rng.integers(len(prompts)))]
        imgs = render_group(it.spec, 4, rng)
        if rng.random() < 0.5:
            imgs = augment(torch.from_numpy(imgs), g).numpy()
        batch.add(imgs, it.text, it.spec)
    for _ in range(n_matched):
        it = prompts[int(rng.integers(len(prompts)))]
        batch.add(matched_group(it.spec, 4, rng), it.text, it.spec)
    for _ in range(n_pool if pool_groups else 0):
        text, imgs = pool_groups[int(rng.integers(len(pool_groups)))]
        spec = parse(text)
        extra = [render_group(spec, 2, rng)]
        if n_matched:
            extra.append(sharpened(imgs[:2], float(rng.uniform(0.5, 2.0))))
        batch.add(np.concatenate([imgs, *extra]), text, spec)
    return batch


@torch.no_grad()
def pairwise_accuracy(model: PreferenceModel, encoder, batch: GroupBatch) -> float:
    x, win, lose = batch.tensors()
    if not len(win):
        return float("nan")
    s = model(x, encoder.encode(batch.prompts))
    return float((s[win] > s[lose]).float().mean())


@dataclass(frozen=True, kw_only=True)
class PreferenceTrainOptions:
    """One training run of the preference model; each field is a `--flag` of the command, its help says what it is."""

    out: Path = field(metadata={"help": "output folder (preference.safetensors, preference_log.jsonl)"})
    pool: list[Path] = field(default_factory=list, metadata={"help": "sample_pool files (--per-prompt >= 2)"})
    minutes: float = field(default=10.0, metadata={"help": "training time by wall clock, 0.01..600"})
    max_steps: int = field(default=100_000, metadata={"help": "step cap (the budget usually ends first)"})
    render_groups: int = field(default=24, metadata={"help": "render groups (4 images) per step"})
    pool_groups: int = field(default=8, metadata={"help": "generated groups (K samples + 2 renders) per step"})
    matched_groups: int = field(default=0, metadata={
        "help": "groups per step of one scene varied in one property (and, in generated groups, two unsharp-masked "
                "samples)"})
    near_miss_groups: int = field(default=0, metadata={
        "help": "groups per step of one styled scene and copies that each break the prompt in one attribute"})
    token_queries: int = field(default=0, metadata={
        "help": "learned queries reading the prompt's token states, 0..16 (0: pooled embedding only, or the --init "
                "checkpoint's own); with --init, a pooled-only checkpoint grows them zero-initialised"})
    tie_weight: float = field(default=0.0, metadata={
        "help": "weight of the tie loss on pairs the rater rates within 1 point (saturated taste, two broken "
                "prompts), 0..10; 0: ties left out"})
    lr: float = field(default=1e-3, metadata={"help": "AdamW peak learning rate, 1e-6..0.1"})
    seed: int = field(default=0, metadata={"help": "data and init seed"})
    threads: int = field(default=0, metadata={"help": "torch threads (0: torch default)"})
    init: Path | None = field(default=None, metadata={"help": "continue from this preference checkpoint"})

    def __post_init__(self) -> None:
        for name, lo, hi in (("minutes", 0.01, 600.0), ("lr", 1e-6, 1e-1), ("tie_weight", 0.0, 10.0)):
            check_range(name, getattr(self, name), lo, hi)
        for name, least in (("render_groups", 1), ("pool_groups", 0), ("matched_groups", 0), ("near_miss_groups", 0),
                            ("max_steps", 1)):
            if getattr(self, name) < least:
                raise ConfigError(name, getattr(self, name), f"an integer >= {least}")
        if not 0 <= self.token_queries <= 16:
            raise ConfigError("token_queries", self.token_queries, "an integer in 0..16")


def train_preference(a: PreferenceTrainOptions, command: str) -> dict[str, float]:
    """Train until the budget or `max_steps` ends and save the checkpoint (`command` is its provenance); returns
    the final held-out pairwise accuracies."""
    if a.threads:
        torch.set_num_threads(a.threads)
    from flowbp_core.world.reward import load_recogniser
    from flowbp_core.world.text import shared_encoder

    a.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(a.seed)
    rng, g = np.random.default_rng(a.seed), torch.Generator().manual_seed(a.seed)
    encoder = shared_encoder()
    train_items = prompt_pool("train", 3000, seed=a.seed + 1)
    pool_train, pool_val = load_pool(a.pool, a.seed) if a.pool else ([], [])
    val_rng = np.random.default_rng(10_000 + a.seed)
    heldout = prompt_pool("heldout", 600, seed=a.seed + 2)
    val_render = build_batch(val_rng, torch.Generator().manual_seed(10_000), heldout, 128, [], 0)
    val_matched = build_batch(val_rng, torch.Generator().manual_seed(10_001), heldout, 0, [], 0, n_matched=96)
    val_near_miss = build_batch(val_rng, torch.Generator().manual_seed(10_002), heldout, 0, [], 0, n_near_miss=96)
    val_pool = GroupBatch()
    for text, imgs in pool_val:
        val_pool.add(imgs, text, parse(text))
    if a.init is not None:
        from flowbp_core.world.preference import load_preference

        model, _ = load_preference(a.init, token_queries=a.token_queries or None)
        cfg = model.cfg
    else:
        cfg = PreferenceConfig(token_queries=a.token_queries)
        model = PreferenceModel(cfg)
        model.init_from_recogniser(load_recogniser()[0])
    model.requires_grad_(True).train()
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=1e-4)
    log = open(a.out / "preference_log.jsonl", "w")
    start, step, losses, budget = time.time(), 0, [], a.minutes * 60

    def evaluate() -> dict:
        model.eval()
        acc = {"val_render_pair_acc": round(pairwise_accuracy(model, encoder, val_render), 4),
               "val_matched_pair_acc": round(pairwise_accuracy(model, encoder, val_matched), 4),
               "val_near_miss_pair_acc": round(pairwise_accuracy(model, encoder, val_near_miss), 4)}
        if val_pool.pairs:
            acc["val_generated_pair_acc"] = round(pairwise_accuracy(model, encoder, val_pool), 4)
        model.train()
        return acc

    while step < a.max_steps and time.time() - start < budget:
        batch = build_batch(rng, g, train_items, a.render_groups, pool_train, a.pool_groups, a.matched_groups,
                            a.near_miss_groups)
        x, win, lose = batch.tensors()
        s = model(x, encoder.encode(batch.prompts))
        loss = bradley_terry_loss(s[win], s[lose])
        if a.tie_weight and batch.ties:
            tie_a, tie_b = batch.tie_index()
            loss = loss + a.tie_weight * tie_loss(s[tie_a], s[tie_b])
        for pg in opt.param_groups:
            pg["lr"] = clock_cosine_lr(a.lr, (time.time() - start) / budget, step, warmup=50)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        step += 1
        if step % 50 == 0:
            rec = {"step": step, "loss": round(float(np.mean(losses[-50:])), 4), "pairs": len(win),
                   "elapsed_min": round((time.time() - start) / 60, 2), **evaluate()}
            log.write(json.dumps(rec) + "\n")
            log.flush()
            print(json.dumps(rec), flush=True)
    final = evaluate()
    model.eval()
    digest = save_checkpoint(
        dict(model.state_dict()), a.out / "preference.safetensors",
        config={"model": cfg.as_dict(), "train": {k: (str(v) if isinstance(v, Path) else
                                                      [str(x) for x in v] if isinstance(v, list) else v)
                                                  for k, v in asdict(a).items()}},
        data_seed=a.seed, command=command,
        extra={"steps": step, "train_minutes": round((time.time() - start) / 60, 2), "heldout_pair_accuracy": final},
    )
    print(json.dumps({"final": final, "steps": step, "sha256": digest}), flush=True)
    log.close()
    return final
