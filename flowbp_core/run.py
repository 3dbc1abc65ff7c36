"""From a RunConfig to the parts of a run, and the single-process loop that drives them.

`build_components` is shared by everything that runs a job: this loop (no Ray), the Ray rollout workers and
learners (services/runtime) and the demo, so a config means the same thing everywhere. The loop here calls
`flowbp_core.step`'s `rollout_step` and `learn_step` one after the other, which is also the reference the
distributed runtime is tested against.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from . import backbones, methods
from .cache import TrajectoryCache
from .checkpoint import (SHARDED, CheckpointState, ShardedState, latest_complete, layout, load_checkpoint,
                         load_sharded, save_checkpoint, save_sharded_checkpoint)
from .config import PromptSource, RewardSpec, RunConfig
from .dtypes import resolve_dtype
from .errors import ConfigError
from .guidance import GuidanceConfig
from .stages import ROLLOUT, timed
from .step import StepResult, learn_step, rollout_step, step_plan
from .training import EMA, BadStepGuard, PromptSampler

log = logging.getLogger("flowbp.run")

DATA_DIR = Path(__file__).resolve().parent / "data"


def run_stamp() -> str:
    """The local time as run ids and run folders carry it: YYYYmmdd-HHMMSS."""
    return time.strftime("%Y%m%d-%H%M%S")


def new_run_id() -> str:
    """The id of a run whose config names none: run-<run_stamp()>-<6 hex>."""
    return f"run-{run_stamp()}-{uuid.uuid4().hex[:6]}"


# --------------------------------------------------------------------------------------------- prompts
PROMPT_FILES = {"hpdv2": DATA_DIR / "hpdv2_eval_prompts.txt", "geneval": DATA_DIR / "geneval_metadata.jsonl"}
WORLD_SETS = ("world_train", "world_heldout")


def _read_prompt_file(path: Path) -> list[str]:
    """One prompt a line (blank lines skipped), or for .jsonl a JSON object with a "prompt" field a line."""
    text = path.read_text(encoding="utf-8")
    if path.suffix != ".jsonl":
        return [ln.strip() for ln in text.splitlines() if ln.strip()]
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(str(json.loads(line)["prompt"]))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ConfigError(f"prompts.file line {n}", line[:80], 'a JSON object with a "prompt" field') from e
    return out


def load_prompts(source: PromptSource | str, limit: int | None = None) -> list[str]:
    """The prompts of a run config's `PromptSource` (inline prompts, a file or a named set), or of a string as the
    eval command line gives it (a set name or a file path). Files: .txt one prompt a line, .jsonl a "prompt" field
    a line. Sets: `world_train` / `world_heldout` (the embedded world's captions), `hpdv2`, `geneval`. The first
    `limit` prompts when `limit` is set (None or 0: all)."""
    if isinstance(source, str):
        source = PromptSource(set=source) if source in (*WORLD_SETS, *PROMPT_FILES) else PromptSource(file=source)
    if source.prompts is not None:
        out = list(source.prompts)
    elif source.file is not None:
        p = Path(source.file)
        if not p.is_file():
            raise ConfigError("prompts.file", source.file, "a path to an existing .txt or .jsonl file (or a set: "
                              f"{', '.join((*WORLD_SETS, *PROMPT_FILES))})")
        out = _read_prompt_file(p)
    elif source.set in WORLD_SETS:
        from .world.data import heldout_prompts, train_prompts

        items = train_prompts() if source.set == "world_train" else heldout_prompts()
        out = [it.text for it in items]
    elif source.set in PROMPT_FILES:
        out = _read_prompt_file(PROMPT_FILES[source.set])
    else:  # pragma: no cover - PromptSource guarantees one source
        raise ConfigError("prompts", source, "one of prompts, file, set")
    if not out:
        raise ConfigError("prompts", source.model_dump(exclude_none=True), "a source with at least one prompt")
    return out[:limit] if limit else out


# ------------------------------------------------------------------------------------------ components
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("backbone.device", name, "'cpu' or 'auto' on a machine without CUDA")
    return torch.device(name)


def lora_config(cfg: RunConfig):
    """The run's `backbone.lora` as the backbones' `LoRAConfig` (the learner's adapter and the rollout's merge)."""
    from .backbones.base import LoRAConfig

    lo = cfg.backbone.lora
    return LoRAConfig(rank=lo.rank, alpha=lo.alpha, dropout=lo.dropout,
                      target_modules=tuple(lo.target_modules) if lo.target_modules else None)


def build_backbone(cfg: RunConfig, device: torch.device | None = None, trainable: bool = True,
                   text_encoders: bool = True):
    """The configured backbone; `text_encoders=False` loads none (a learner: its conditioning comes in the
    caches), and its transformer and trainable init are those of a build with them."""
    spec = cfg.backbone
    device = device or resolve_device(spec.device)
    kw = backbones.build_kwargs(tiny=spec.tiny, path=spec.pretrained, local_files_only=spec.local_files_only,
                                dtype=resolve_dtype(spec.dtype), device=device,
                                text_encoders=None if text_encoders else False, height=spec.height, width=spec.width)
    bb = backbones.build(spec.name, spec.pretrained, tiny=spec.tiny, **kw)
    if trainable:
        if spec.finetune == "lora":
            bb.apply_lora(lora_config(cfg))
        elif hasattr(bb, "enable_full_finetune"):
            bb.enable_full_finetune()
        if spec.gradient_checkpointing:
            bb.enable_gradient_checkpointing()
    return bb


def build_reward(spec: RewardSpec, device: torch.device | str = "cpu"):
    """The configured reward terms as one Reward (a Panel when there are several or weights differ from 1)."""
    from . import rewards

    built = [(rewards.build(t.name, **t.kwargs), t.weight) for t in spec.terms]
    reward = built[0][0] if len(built) == 1 and built[0][1] == 1.0 else rewards.Panel(built)
    if hasattr(reward, "to"):
        reward = reward.to(device)
    return reward


def guidance_for(cfg: RunConfig, backbone, method=None) -> GuidanceConfig:
    """The backbone's guidance at the configured scale, with the method's say on the negative branch's gradient
    (`method.guidance`); the rollout runs without gradient, so the same config serves rollout and learner."""
    base = backbone.preset.guidance
    if cfg.sampling.guidance_scale is not None:
        base = GuidanceConfig(mode=base.mode, scale=cfg.sampling.guidance_scale, detach_negative=base.detach_negative)
    return base if method is None or not hasattr(method, "guidance") else method.guidance(base)


def loss_for(cfg: RunConfig, method, guidance: GuidanceConfig):
    """The configured per-sample loss, times the method's loss scale (1/g for CFG gradient compensation)."""
    from .losses import build_loss, scaled

    loss_kw = {"clip": cfg.reward.clip} if cfg.reward.loss == "hinge" else {}
    loss = build_loss(cfg.reward.loss, **loss_kw)
    return scaled(loss, method.loss_scale(guidance)) if hasattr(method, "loss_scale") else loss


def build_method(cfg: RunConfig):
    """The configured method with the backbone's preset (no model: the Ray driver builds it to draw plans)."""
    return methods.build(cfg.method.name, backbone=cfg.method_preset(), **cfg.method.params)


@dataclass
class RunComponents:
    cfg: RunConfig
    backbone: Any
    method: Any
    guidance: GuidanceConfig
    n_steps: int
    device: torch.device
    prompts: PromptSampler
    reward: Any | None = None
    loss_fn: Callable[[torch.Tensor], torch.Tensor] | None = None

    def score_fn(self) -> Callable[[torch.Tensor, list[str]], torch.Tensor]:
        """Colocated scoring: decode in the learner's graph, then the reward."""
        backbone, reward = self.backbone, self.reward
        if reward is None:
            raise RuntimeError("this RunComponents was built without a reward (with_reward=False)")

        def score(latents: torch.Tensor, prompts: list[str]) -> torch.Tensor:
            return reward(backbone.decode(latents), prompts)

        return score


def build_components(cfg: RunConfig, *, device: torch.device | None = None, with_reward: bool = True,
                     trainable: bool = True, text_encoders: bool = True) -> RunComponents:
    device = device or resolve_device(cfg.backbone.device)
    torch.manual_seed(cfg.train.seed)
    backbone = build_backbone(cfg, device, trainable=trainable, text_encoders=text_encoders)
    method = build_method(cfg)
    prompts = PromptSampler(load_prompts(cfg.train.prompts), cfg.train.batch_size, cfg.train.seed)
    reward = build_reward(cfg.reward, device) if with_reward else None
    guidance = guidance_for(cfg, backbone, method)
    return RunComponents(cfg=cfg, backbone=backbone, method=method, guidance=guidance,
                         n_steps=cfg.sampling.n_steps, device=device, prompts=prompts, reward=reward,
                         loss_fn=loss_for(cfg, method, guidance))


def rollout_for(comp: RunComponents, step: int, policy_version: int,
                prompts: list[str] | None = None) -> TrajectoryCache:
    """Step `step`'s whole-batch rollout in this process, issued with the step's plan (the loop's rollout, and a
    test's stand-in for a rollout worker); `prompts` default to the run's batch of that step."""
    seed = comp.cfg.train.seed
    return rollout_step(backbone=comp.backbone, guidance=comp.guidance,
                        plan=step_plan(comp.method, comp.n_steps, seed, step),
                        prompts=comp.prompts.batch(step) if prompts is None else prompts, seed=seed, step=step,
                        policy_version=policy_version, state_dtype=resolve_dtype(comp.cfg.backbone.dtype),
                        device=comp.device)


def make_optimizer(cfg: RunConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if not params:
        raise ConfigError("backbone.finetune", cfg.backbone.finetune, "a setting that leaves trainable parameters")
    return torch.optim.AdamW(params, lr=cfg.train.lr, betas=tuple(cfg.train.betas), eps=cfg.train.eps,
                             weight_decay=cfg.train.weight_decay)


# ------------------------------------------------------------------------------------------------ loop
@dataclass
class LoopResult:
    run_dir: Path
    steps_done: int
    results: list[StepResult] = field(default_factory=list)
    resumed_from: int | None = None


def run_dir_for(cfg: RunConfig) -> Path:
    run_id = cfg.run_id or new_run_id()
    return Path(cfg.checkpoint.dir) / run_id


def train_loop(cfg: RunConfig, *, run_dir: Path | None = None, comp: RunComponents | None = None,
               on_step: Callable[[StepResult], None] | None = None,
               should_stop: Callable[[], bool] | None = None) -> LoopResult:
    """Single-process training: rollout -> learner step, with checkpoints, resume and metrics.jsonl."""
    run_dir = Path(run_dir) if run_dir is not None else run_dir_for(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    comp = comp or build_components(cfg)
    params = comp.backbone.trainable_parameters()
    optimizer = make_optimizer(cfg, params)
    ema = EMA(params, cfg.train.ema_decay) if cfg.train.ema_decay is not None else None
    start, policy_version, resumed = 0, 0, None
    latest = latest_complete(run_dir) if cfg.checkpoint.resume else None
    if latest is not None:
        st = restore(comp, latest, optimizer, ema)
        start, policy_version, resumed = st.step, st.policy_version, st.step
        log.info("resumed from %s (step %d)", latest, st.step)
    metrics_path = run_dir / "metrics.jsonl"
    _truncate_metrics(metrics_path, start)
    guard = BadStepGuard(cfg.train.max_bad_steps)
    score = comp.score_fn()
    out = LoopResult(run_dir=run_dir, steps_done=start, resumed_from=resumed)
    for step in range(start, cfg.train.steps):
        if should_stop is not None and should_stop():
            break
        timings: dict[str, float] = {}
        with timed(ROLLOUT, timings):
            cache = rollout_for(comp, step, policy_version)
        res = learn_step(cache, comp, step=step, optimizer=optimizer, ema=ema, score=score, timings=timings)
        if not res.skipped:
            policy_version += 1
        out.results.append(res)
        with open(metrics_path, "a") as fh:
            fh.write(res.to_json() + "\n")
        if on_step is not None:
            on_step(res)
        guard.observe(res)  # raises NonFiniteStreak after max_bad_steps in a row
        out.steps_done = step + 1
        if not res.skipped and (out.steps_done % cfg.checkpoint.every == 0 or out.steps_done == cfg.train.steps):
            save(comp, run_dir, out.steps_done, policy_version, optimizer, ema, res)
    return out


def restore(comp: RunComponents, path: Path, optimizer: torch.optim.Optimizer, ema: EMA | None) -> CheckpointState:
    """Load a complete checkpoint of either layout into the live (unsharded) weights, optimizer and EMA."""
    if layout(path) == SHARDED:
        return load_sharded(path, comp.backbone.transformer, optimizer, ema.shadow if ema is not None else None)
    st = load_checkpoint(path)
    comp.backbone.load_trainable_state_dict(st.trainable)
    if st.optimizer is not None:
        optimizer.load_state_dict(st.optimizer)
    if ema is not None and st.ema is not None:
        ema.load_state_dict(st.ema)
    return st


@dataclass
class FullState:
    """What a checkpoint holds, as full tensors: given by a caller whose live model is sharded (the FSDP learner
    gathers it on every rank, then rank 0 saves); read from the live objects otherwise."""
    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    ema: dict[str, torch.Tensor] | None
    lora_export: dict[str, torch.Tensor] | None = None


def save(comp: RunComponents, run_dir: Path, step: int, policy_version: int, optimizer, ema: EMA | None,
         res: StepResult | None = None, full: FullState | None = None) -> Path:
    exporter = getattr(comp.backbone, "export", None)

    def write_export(tmp: Path) -> None:
        if exporter is None or comp.cfg.backbone.finetune != "lora":
            return
        if full is not None:
            from flowbp_core.export import export_backbone

            export_backbone(comp.backbone, str(tmp / "lora"), gathered=full.lora_export)
        else:
            exporter(str(tmp / "lora"))

    state = CheckpointState(step=step, policy_version=policy_version,
                            trainable=full.trainable if full else comp.backbone.trainable_state_dict(),
                            optimizer=full.optimizer if full else optimizer.state_dict(),
                            ema=(full.ema if full else ema.state_dict()) if ema else None,
                            config=comp.cfg.to_dict(), torch_rng=torch.get_rng_state(),
                            metrics=_metrics(res))
    return save_checkpoint(run_dir, state, keep=comp.cfg.checkpoint.keep, extra_writer=write_export)


def save_sharded(comp: RunComponents, run_dir: Path, step: int, policy_version: int, optimizer, ema: EMA | None,
                 res: StepResult | None = None) -> Path | None:
    """A `sharded` checkpoint of a full fine-tune under FSDP (collective: every rank writes its shards; the path
    on rank 0, None elsewhere)."""
    state = ShardedState(step=step, policy_version=policy_version, module=comp.backbone.transformer,
                         optimizer=optimizer, ema_shadow=ema.shadow if ema is not None else None,
                         config=comp.cfg.to_dict(), torch_rng=torch.get_rng_state(), metrics=_metrics(res))
    return save_sharded_checkpoint(run_dir, state, keep=comp.cfg.checkpoint.keep)


def _metrics(res: StepResult | None) -> dict[str, float]:
    return {"loss": res.loss, "reward_mean": res.reward_mean} if res else {}


def _truncate_metrics(path: Path, keep_below_step: int) -> None:
    """On resume, drop metric lines of steps that will be redone, so every step is counted once."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) < keep_below_step:
                kept.append(line)
        except json.JSONDecodeError:
            continue
    path.write_text("".join(k + "\n" for k in kept))
