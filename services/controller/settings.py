"""Controller settings: one typed object, read from FLOWBP_* environment variables (or built in code by tests).

pydantic-settings is not in our pinned environment, so `ControllerSettings.from_env()` does the small part of
its job we need: each field maps to `FLOWBP_<FIELD NAME IN UPPER CASE>`, values are validated by pydantic, and a
bad value fails at start-up naming the variable. Secrets (the tokens) never live in this object: it only says
where to read them from (see auth.py), so printing or logging the settings can never leak one.

Every value arrives as a string, so numbers and booleans are parsed from text (`"3"` is 3, `"true"` is true), but
NaN and +-inf are refused in every spelling and every number has a ceiling.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, get_origin
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from flowbp_core.config import FINITE_NUMBERS, MAX_PROMPT_CHARS, MAX_PROMPTS

ENV_PREFIX = "FLOWBP_"


class Limits(BaseModel):
    """Request limits: a controller on a shared network must not be made to store or forward unbounded input."""

    model_config = ConfigDict(extra="forbid", **FINITE_NUMBERS)

    max_body_bytes: int = Field(1_000_000, ge=1024, le=1_000_000_000,
                                description="largest request body accepted (413 above)")
    # The schema's own ceilings are the defaults; an operator may only lower them (the schema rejects more anyway).
    max_prompts: int = Field(MAX_PROMPTS, ge=1, le=MAX_PROMPTS, description="most prompts in one prompt list")
    max_prompt_chars: int = Field(MAX_PROMPT_CHARS, ge=1, le=MAX_PROMPT_CHARS, description="longest prompt (chars)")
    max_labels: int = Field(32, ge=0, le=1000, description="most labels on one job")
    max_log_bytes: int = Field(1_000_000, ge=1024, le=1_000_000_000,
                               description="most log bytes returned by one logs call")


class ControllerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", **FINITE_NUMBERS)

    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = Field("flowbp:", description="key prefix, so one Redis can hold several controllers")
    redis_timeout_s: float = Field(2.0, gt=0, le=600, description="socket timeout: a dead Redis gives 503 this fast")

    ray_address: str = Field("http://127.0.0.1:8265", description="Ray job server (dashboard) URL")
    ray_timeout_s: float = Field(10.0, gt=0, le=600, description="timeout of one HTTP call to the Ray job server")
    submit_retries: int = Field(3, ge=1, le=20, description="tries of one Ray call before it counts as failed")
    retry_backoff_s: float = Field(0.5, ge=0, le=3600, description="first back-off; doubles each retry")
    retry_backoff_max_s: float = Field(30.0, ge=0, le=3600)
    max_resubmits: int = Field(2, ge=0, le=100, description="default resubmissions of a job whose Ray job died")
    max_active_jobs: int = Field(4, ge=0, le=10_000,
                                 description="jobs on Ray at once; more wait as pending (0 pauses dispatch)")
    pending_timeout_s: float = Field(3600.0, gt=0, le=30 * 86_400,
                                     description="a job Ray cannot take for this long fails")

    reconcile_interval_s: float = Field(2.0, gt=0, le=3600, description="how often Ray's job status is polled")
    reconciler_enabled: bool = True
    check_registries: bool = Field(True, description="reject unknown backbone/method/reward names at submit "
                                                     "(imports the registries, and with them torch, once)")

    token_env: str = Field("FLOWBP_TOKENS", description="env var holding comma-separated bearer tokens")
    token_file: Path | None = Field(None, description="file with one bearer token per line (# comments allowed)")

    entrypoint: str = Field("python -m services.entrypoints.train",
                            description="command the Ray job runs; `--config <spec file>` is appended")
    runtime_env: dict[str, Any] = Field(default_factory=dict, description="Ray runtime_env of every job (JSON)")
    runs_dir: Path = Field(Path("runs"), description="where runs/<run_id>/step_<n>/ checkpoints are written")
    spec_dir: Path = Field(Path("runs/_jobs"), description="where each job's resolved spec file is written")

    limits: Limits = Field(default_factory=Limits)

    host: str = "127.0.0.1"
    log_level: str = Field("info", pattern="^(debug|info|warning|error)$")
    port: int = Field(8000, ge=0, le=65535)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: Any) -> "ControllerSettings":
        """Read FLOWBP_<FIELD> for each field (limits as FLOWBP_LIMITS_<FIELD>; dicts as JSON)."""
        env = dict(os.environ if env is None else env)
        values: dict[str, Any] = {}
        for name, info in cls.model_fields.items():
            if name == "limits":
                continue
            key = ENV_PREFIX + name.upper()
            if key in env:
                values[name] = _parse_env(key, env[key], info.annotation)
        limits: dict[str, Any] = {}
        for name in Limits.model_fields:
            key = f"{ENV_PREFIX}LIMITS_{name.upper()}"
            if key in env:
                limits[name] = env[key]
        if limits:
            values["limits"] = limits
        values.update(overrides)
        try:
            return cls(**values)
        except ValidationError as e:
            problems = "; ".join(
                f"{ENV_PREFIX}{'_'.join(str(p) for p in err['loc']).upper()}: {err['msg']}" for err in e.errors())
            raise SystemExit(f"bad controller settings: {problems}") from None


def _parse_env(key: str, raw: str, annotation: Any) -> Any:
    if get_origin(annotation) is dict:
        try:
            return json.loads(raw, parse_constant=_not_a_number, parse_float=_finite_float)
        except ValueError as e:  # JSONDecodeError is one
            raise SystemExit(f"bad controller settings: {key} must be a JSON object of finite numbers ({e})") from None
    return raw


def _not_a_number(token: str) -> float:
    raise ValueError(f"{token} is not a number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 parses as inf
        raise ValueError(f"{text} is not a finite number")
    return value


def redact_url(url: str) -> str:
    """The URL without its password, for messages and logs (redis://:secret@host -> redis://:***@host)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.hostname or ""
    if parts.port:
        netloc = f"{netloc}:{parts.port}"
    user = parts.username or ""
    return urlunsplit((parts.scheme, f"{user}:***@{netloc}", parts.path, parts.query, parts.fragment))
