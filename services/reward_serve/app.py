"""Ray Serve application builder for a standing reward service (`serve run services.reward_serve.app:build_app`,
or the chart's RayService `importPath`).

The training runtime deploys its own reward apps per run (services/runtime/run_setup.py); this builder is for a
long-lived service shared by evaluations and by runs whose `reward.placement` is `served`. Its arguments come
from YAML (the RayService's `args`), so they are validated into a typed model here, with the field named in the
error, before any model is loaded.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from flowbp_core.config import RewardTerm
from flowbp_core.errors import ConfigError
from services.reward_serve.deployment import RewardScore, RewardValueAndGrad
from services.reward_serve.engine import RewardServiceSpec


class RewardAppArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rewards: list[RewardTerm] = Field(default_factory=lambda: [RewardTerm(name="world_attributes")], min_length=1)
    score_only: bool = Field(False, description="evaluation only: rewards without gradients")
    device: str = "cpu"
    name: str = "reward"
    max_batch_size: int = Field(16, ge=1, le=1024)
    batch_wait_timeout_s: float = Field(0.01, ge=0.0, le=10.0)


def spec_from_args(args: dict[str, Any] | None) -> tuple[RewardAppArgs, RewardServiceSpec]:
    try:
        parsed = RewardAppArgs.model_validate(args or {})
    except ValidationError as e:
        first = e.errors()[0]
        raise ConfigError("rewardService.args." + ".".join(str(p) for p in first["loc"]), first.get("input"),
                          first["msg"]) from e
    spec = RewardServiceSpec(panel=tuple((t.name, t.weight) for t in parsed.rewards),
                             reward_kwargs={t.name: dict(t.kwargs) for t in parsed.rewards if t.kwargs},
                             device=parsed.device, name=parsed.name, max_batch_size=parsed.max_batch_size,
                             batch_wait_timeout_s=parsed.batch_wait_timeout_s)
    return parsed, spec


def build_app(args: dict[str, Any] | None = None):
    """Serve application builder: `args` as in RewardAppArgs; replicas and resources come from the Serve config."""
    parsed, spec = spec_from_args(args)
    deployment = RewardScore if parsed.score_only else RewardValueAndGrad
    return deployment.bind(spec)
