"""The one run schema: YAML run files, dotted CLI overrides, the REST job spec and the copy in every checkpoint.

A bad value is rejected where it enters, with the dotted path of the field in the message
(`method.k: 30 is not allowed: expected ...`). Method parameters use the names of algorithms.md in lower case
and are checked by building the method itself, so the schema never drifts from the engine.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator)

from .config_base import FINITE_NUMBERS as FINITE_NUMBERS
from .config_base import FLOAT32_MAX, MAX_METHOD_PARAM, MAX_SEED, STRICT_NUMBERS
from .config_base import Strict as _Strict
from .errors import ConfigError
from .runtime_spec import RuntimeSpec

SCHEMA_VERSION = 1

# Request-side limits: the controller enforces the same numbers, so a job that validates here is accepted there.
MAX_PROMPTS = 10_000
MAX_PROMPT_CHARS = 1_000

Scalar = str | int | float | bool

class LoRASpec(_Strict):
    rank: int = Field(16, ge=1, le=1024, description="LoRA rank r")
    alpha: float | None = Field(None, gt=0, le=FLOAT32_MAX, description="LoRA alpha; defaults to the rank (scale 1)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | None = Field(
        None, description="module names to adapt; None uses the backbone's attention projections")


class BackboneSpec(_Strict):
    name: str = Field("embedded", description="registered backbone: embedded, sd3, flux1, flux2")
    pretrained: str | None = Field(None, description="hub id or local folder; None uses the backbone's default "
                                                     "(the committed checkpoint for `embedded`)")
    tiny: bool = Field(False, description="build a tiny random model from config (tests, smoke runs)")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = Field("auto", description="'auto', 'cpu', 'cuda' or 'cuda:N'")
    height: int | None = Field(None, ge=8, le=4096, description="image height; None: backbone default")
    width: int | None = Field(None, ge=8, le=4096, description="image width; None: backbone default")
    finetune: Literal["lora", "full"] = "lora"
    lora: LoRASpec = Field(default_factory=LoRASpec)
    gradient_checkpointing: bool = False
    local_files_only: bool = True

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError(f"device {v!r} is not one of 'auto', 'cpu', 'cuda', 'cuda:N'")


class MethodSpec(BaseModel):
    """A registered method plus its parameters (extra keys: `k`, `late_bias`, `gamma`, `alpha`, ...)."""

    model_config = ConfigDict(extra="allow", validate_assignment=True, **STRICT_NUMBERS)

    name: str = Field("flowbp_sparse", description="registered method name (flowbp_core.methods.names())")
    preset: Literal["sd35", "flux1", "flux2"] | None = Field(
        None, description="paper defaults per backbone; None picks the backbone's preset")

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @model_validator(mode="after")
    def _scalar_params(self) -> "MethodSpec":
        for key, value in self.params.items():
            listed = isinstance(value, (list, tuple))
            ok = isinstance(value, (str, int, float, bool)) or (
                listed and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value))
            if not ok:
                raise ValueError(f"method parameter {key!r} must be a number, string, bool or list of numbers, "
                                 f"got {type(value).__name__}")
            numbers = [x for x in (value if listed else [value]) if not isinstance(x, (bool, str))]
            if not all(abs(x) <= MAX_METHOD_PARAM for x in numbers):  # false for NaN and +-inf too
                raise ValueError(f"method parameter {key!r} must be a finite number in [-{MAX_METHOD_PARAM:g}, "
                                 f"{MAX_METHOD_PARAM:g}], got {value!r}")
        return self


class RewardTerm(_Strict):
    name: str = Field(..., description="registered reward (flowbp_core.rewards.names())")
    weight: float = Field(1.0, ge=-FLOAT32_MAX, le=FLOAT32_MAX, description="weight in the panel")
    kwargs: dict[str, Scalar] = Field(default_factory=dict, description="constructor arguments, e.g. a path")


class ServedRewardSpec(_Strict):
    replicas: int = Field(1, ge=1, le=64)
    num_gpus: float = Field(0.0, ge=0.0, le=8.0)
    num_cpus: float = Field(0.5, gt=0.0, le=16.0)
    max_batch_size: int = Field(16, ge=1, le=1024)
    batch_wait_timeout_s: float = Field(0.01, ge=0.0, le=10.0)
    decode_on_reward_side: bool = Field(False, description="send latents; the reward service decodes them")
    request_timeout_s: float = Field(120.0, gt=0, le=86_400.0)
    max_retries: int = Field(3, ge=0, le=20)


class RewardSpec(_Strict):
    terms: list[RewardTerm] = Field(default_factory=lambda: [RewardTerm(name="world_attributes")], min_length=1)
    placement: Literal["colocated", "served"] = "colocated"
    loss: Literal["hinge", "neg_mean"] = "hinge"
    clip: float = Field(0.55, ge=-FLOAT32_MAX, le=FLOAT32_MAX, description="hinge threshold c in ReLU(c - r)")
    served: ServedRewardSpec = Field(default_factory=ServedRewardSpec)


class SamplingSpec(_Strict):
    n_steps: int = Field(25, ge=1, le=1000, description="rollout Euler steps N; wins over the backbone's "
                         "preset n_steps, which only serves sampling outside a run")
    guidance_scale: float | None = Field(None, ge=0.0, le=50.0, description="None: backbone default")
    eval_n_steps: int | None = Field(None, ge=1, le=1000)


class PromptSource(_Strict):
    """Exactly one of: inline prompts, a file (one a line), or a named set shipped with the project."""

    prompts: list[str] | None = Field(None, max_length=MAX_PROMPTS)
    file: str | None = None
    set: Literal["world_train", "world_heldout", "hpdv2", "geneval"] | None = None

    @field_validator("prompts")
    @classmethod
    def _prompt_lengths(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("prompts must not be empty (give at least one, or use `file` / `set`)")
        for i, p in enumerate(v):
            if not p.strip():
                raise ValueError(f"prompt {i} is empty")
            if len(p) > MAX_PROMPT_CHARS:
                raise ValueError(f"prompt {i} has {len(p)} characters; at most {MAX_PROMPT_CHARS} are allowed")
        return v

    @model_validator(mode="after")
    def _exactly_one(self) -> "PromptSource":
        given = [n for n in ("prompts", "file", "set") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of prompts, file, set (got {given or 'none'})")
        return self


Beta = Annotated[float, Field(ge=0.0, lt=1.0)]


class TrainSpec(_Strict):
    steps: int = Field(100, ge=1, le=1_000_000)
    batch_size: int = Field(8, ge=1, le=4096, description="prompts per optimizer step (all ranks)")
    lr: float = Field(1e-4, gt=0.0, le=1.0)
    # a JSON/YAML list is the pair; its two numbers keep the strict rules
    betas: tuple[Beta, Beta] = Field((0.9, 0.999), strict=False, description="Adam betas, each in [0, 1)")
    eps: float = Field(1e-8, gt=0.0, le=1.0)
    weight_decay: float = Field(1e-4, ge=0.0, le=1.0)
    grad_clip: float | None = Field(1.0, gt=0.0, le=FLOAT32_MAX)
    ema_decay: float | None = Field(None, ge=0.0, lt=1.0, description="EMA of trainable weights; None: off")
    velocity_penalty: float = Field(0.0, ge=0.0, le=1e6, description="weight of the squared distance between the "
                                    "LoRA model's and the base's velocity at the re-forwarded steps; 0: off")
    seed: int = Field(0, ge=0, le=MAX_SEED)
    max_bad_steps: int = Field(3, ge=1, le=1000, description="non-finite steps in a row that fail the run")
    prompts: PromptSource = Field(default_factory=lambda: PromptSource(set="world_train"))


class CheckpointSpec(_Strict):
    dir: str = Field("runs", description="root folder; checkpoints go to <dir>/<run_id>/step_<n>/")
    every: int = Field(50, ge=1, le=1_000_000)
    keep: int = Field(3, ge=1, le=1000, description="complete checkpoints kept (older ones removed)")
    resume: bool = Field(True, description="resume from the newest complete checkpoint of this run_id")


class EvalSpec(_Strict):
    every: int = Field(0, ge=0, le=1_000_000, description="evaluate every N steps; 0: only at the end")
    prompts: PromptSource = Field(default_factory=lambda: PromptSource(set="world_heldout"))
    limit: int = Field(64, ge=0, le=100_000, description="prompts evaluated; 0: no in-run evaluation")
    seed: int = Field(42, ge=0, le=MAX_SEED)


class RunConfig(_Strict):
    schema_version: Literal[1] = SCHEMA_VERSION
    run_id: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
                               description="checkpoint folder name; None: generated at start")
    backbone: BackboneSpec = Field(default_factory=BackboneSpec)
    method: MethodSpec = Field(default_factory=MethodSpec)
    reward: RewardSpec = Field(default_factory=RewardSpec)
    sampling: SamplingSpec = Field(default_factory=SamplingSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)

    @field_validator("schema_version", mode="before")
    @classmethod
    def _version_is_a_number(cls, v: Any) -> Any:
        if isinstance(v, bool):  # `true == 1` in Python, so the literal check alone would take it
            raise ValueError(f"schema_version must be the integer {SCHEMA_VERSION}, got {v!r}")
        return v

    @model_validator(mode="after")
    def _cross_checks(self) -> "RunConfig":
        from flowbp_core.methods.checks import k_within  # the one k <= N rule, shared with the methods

        k = self.method.params.get("k")
        if isinstance(k, int) and not isinstance(k, bool):
            try:
                k_within(k, self.sampling.n_steps)
            except ConfigError as e:  # a pydantic validator reports a ValueError's text; keep it one sentence
                raise ValueError(f"method.k={k} exceeds sampling.n_steps={self.sampling.n_steps}: "
                                 f"expected {e.allowed}") from None
        return self

    # -- helpers -----------------------------------------------------------------------------------
    def method_preset(self) -> str | None:
        """`method.preset` when set, else the backbone family's own (`backbones.base.method_preset_of`)."""
        if self.method.preset is not None:
            return self.method.preset
        from flowbp_core.backbones.base import method_preset_of

        return method_preset_of(self.backbone.name)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


# --- overrides and loading -------------------------------------------------------------------------

class _RunFileLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # libyaml's parser where it is built
    """PyYAML's safe loader with YAML 1.2's floats: `1e-5` is a number, as in JSON (YAML 1.1 wants `1.0e-5`)."""


_RunFileLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9][0-9_]*(?:\.[0-9_]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)"
               r"|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def load_yaml(text: str) -> Any:
    """A run file or a `--set` value as data (every entry point reads YAML through here)."""
    return yaml.load(text, Loader=_RunFileLoader)


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value parsed as a YAML scalar/list, so `4`, `0.5`, `true`, `[1,2]` work)."""
    item = item.strip()
    if item.startswith("--"):
        item = item[2:]
    if "=" not in item:
        raise ConfigError("override", item, "the form a.b=value (e.g. method.k=4)")
    key, raw = item.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError("override", item, "a dotted field path before '='")
    try:
        value = load_yaml(raw) if raw.strip() != "" else ""
    except yaml.YAMLError:
        value = raw
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Return a copy of `data` with dotted overrides applied (intermediate sections are created)."""
    out = copy.deepcopy(data)
    for item in overrides or []:
        path, value = parse_override(item)
        node: Any = out
        for depth, part in enumerate(path):
            key: str | int = part
            if isinstance(node, list):  # `reward.terms.0.weight`: a list is indexed by position
                if not (part.isdigit() and int(part) < len(node)):
                    raise ConfigError(".".join(path), value, f"an index in [0, {len(node) - 1}] at {part!r}")
                key = int(part)
            if depth == len(path) - 1:
                node[key] = value
                break
            nxt = node[key] if isinstance(node, list) else node.get(key)
            if nxt is None:
                nxt = node[key] = {}
            if not isinstance(nxt, (dict, list)):
                raise ConfigError(".".join(path), value, f"a path into a section, but {part!r} is a value")
            node = nxt
    return out


def format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        lines.append(f"{loc}: {e['msg']} (got {e.get('input')!r})" if "input" in e and not isinstance(
            e.get("input"), dict) else f"{loc}: {e['msg']}")
    return "invalid run config:\n  " + "\n  ".join(lines)


def config_from_dict(data: dict[str, Any], overrides: list[str] | None = None,
                     check_registries: bool = True) -> RunConfig:
    """Validate a dict (+ overrides) into a RunConfig; raise ConfigError with every failing field path."""
    merged = apply_overrides(data or {}, overrides)
    try:
        cfg = RunConfig.model_validate(merged)
    except ValidationError as e:
        first = e.errors()[0]
        # "Input should be a finite number" -> "expected a finite number", after ConfigError's own words
        allowed = first["msg"].removeprefix("Input should be ").removeprefix("Value error, ")
        raise ConfigError(".".join(str(p) for p in first["loc"]) or "config", first.get("input"),
                          allowed, hint=format_validation_error(e) if len(e.errors()) > 1 else None) from e
    if check_registries:
        check_against_registries(cfg)
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None, check_registries: bool = True) -> RunConfig:
    p = Path(path)
    if not p.is_file():
        raise ConfigError("config", str(p), "a path to an existing YAML run file")
    try:
        data = load_yaml(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError("config", str(p), f"valid YAML ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError("config", str(p), "a YAML mapping at the top level")
    return config_from_dict(data, overrides, check_registries)


def check_against_registries(cfg: RunConfig) -> None:
    """Names and method parameters are checked by the registries themselves (the single source of truth)."""
    from . import backbones, methods, rewards

    if cfg.backbone.name not in backbones.names():
        raise ConfigError("backbone.name", cfg.backbone.name, f"one of {sorted(backbones.names())}")
    if cfg.method.name not in methods.names():
        raise ConfigError("method.name", cfg.method.name, f"one of {sorted(methods.names())}")
    known_rewards = rewards.names()
    for i, term in enumerate(cfg.reward.terms):
        if term.name not in known_rewards:
            raise ConfigError(f"reward.terms.{i}.name", term.name, f"one of {sorted(known_rewards)}")
    try:
        methods.build(cfg.method.name, backbone=cfg.method_preset(), **cfg.method.params)
    except ConfigError as e:
        field = e.field if e.field.startswith("method.") else f"method.{e.field}"
        raise ConfigError(field, e.value, e.allowed) from e
