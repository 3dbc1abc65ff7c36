"""The job spec the API accepts: the run schema (flowbp_core.config.RunConfig) plus job metadata.

YAML run files, `flowbp submit --set a.b=value` and REST share one schema: `config` IS a RunConfig, so pydantic
reports a bad value with its full path (`body.config.method.k`) and the broken rule, and FastAPI returns that
as 422. What pydantic cannot know (this controller's configured limits, the registries of backbones, methods and
rewards) is checked by `check_spec`, which raises `SpecError` with the same path-and-rule shape.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from flowbp_core.config import STRICT_NUMBERS, RunConfig, check_against_registries
from flowbp_core.errors import ConfigError

from .models import LABEL_KEY_PATTERN, NAME_PATTERN
from .settings import Limits


class JobSubmitRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", **STRICT_NUMBERS)

    name: str = Field(..., pattern=NAME_PATTERN, description="a short name for people (not unique)")
    labels: dict[str, str] = Field(default_factory=dict, description="free-form key/value tags for filtering")
    max_resubmits: int | None = Field(None, ge=0, le=100,
                                      description="resubmissions if the Ray job dies; null: the controller default")
    config: RunConfig = Field(default_factory=RunConfig, description="the run (same schema as the YAML files)")

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        import re

        for k, val in v.items():
            if not re.match(LABEL_KEY_PATTERN, k):
                raise ValueError(f"label key {k!r} must match {LABEL_KEY_PATTERN}")
            if len(val) > 256:
                raise ValueError(f"label {k!r} has a value of {len(val)} characters; at most 256 are allowed")
        return v

    def body_hash(self) -> str:
        """Identity of the request for Idempotency-Key checks (canonical JSON, so key order does not matter)."""
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


class SpecError(ValueError):
    """A spec that parsed but breaks a rule of this controller: carries the field path and the rule."""

    def __init__(self, loc: tuple[str | int, ...], msg: str, kind: str, value: Any = None):
        super().__init__(f"{'.'.join(map(str, loc))}: {msg}")
        self.loc, self.msg, self.kind, self.value = loc, msg, kind, value

    def detail(self) -> dict[str, Any]:
        return {"loc": ["body", *self.loc], "msg": self.msg, "type": self.kind}


def _prompt_lists(cfg: RunConfig) -> list[tuple[tuple[str, ...], list[str]]]:
    found = []
    for section in ("train", "eval"):
        src = getattr(cfg, section).prompts
        if src.prompts is not None:
            found.append(((section, "prompts", "prompts"), src.prompts))
    return found


def check_spec(req: JobSubmitRequest, limits: Limits, check_registries: bool) -> None:
    if len(req.labels) > limits.max_labels:
        raise SpecError(("labels",), f"{len(req.labels)} labels given; at most {limits.max_labels} are allowed",
                        "too_many_labels")
    for loc, prompts in _prompt_lists(req.config):
        if len(prompts) > limits.max_prompts:
            raise SpecError(("config", *loc), f"{len(prompts)} prompts given; at most {limits.max_prompts} are "
                            "allowed", "too_many_prompts")
        for i, p in enumerate(prompts):
            if len(p) > limits.max_prompt_chars:
                raise SpecError(("config", *loc, i), f"prompt has {len(p)} characters; at most "
                                f"{limits.max_prompt_chars} are allowed", "prompt_too_long")
    if check_registries:
        try:
            check_against_registries(req.config)
        except ConfigError as e:
            raise SpecError(("config", *e.field.split(".")), str(e), "not_registered", e.value) from None
