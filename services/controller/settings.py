"""Controller settings: one typed object, read from FLOWBP_* environment variables (or built in code by tests).

pydantic-settings reads them: each field is `FLOWBP_<FIELD NAME IN UPPER CASE>`, each request limit
`FLOWBP_LIMITS_<FIELD>`, `FLOWBP_RUNTIME_ENV` is JSON (or `FLOWBP_RUNTIME_ENV_<KEY>` sets one top-level key to a
string), and no `.env` or secrets file is read. A bad value fails at
start-up naming the variable, the value and what is allowed. Secrets (the tokens) never live in this object: it
only says where to read them from (see auth.py), so printing or logging the settings can never leak one.

Every value arrives as a string, so numbers and booleans are parsed from text (`"3"` is 3, `"true"` is true), but
NaN and +-inf are refused in every spelling (JSON included) and every number has a ceiling.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import (BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict,
                               SettingsError)

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


class ControllerSettings(BaseSettings):
    # The nested split happens once, after the field name: FLOWBP_LIMITS_MAX_BODY_BYTES is limits.max_body_bytes.
    model_config = SettingsConfigDict(extra="forbid", env_prefix=ENV_PREFIX, env_nested_delimiter="_",
                                      env_nested_max_split=1, **FINITE_NUMBERS)

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
    runtime_env: Annotated[dict[str, Any], NoDecode] = Field(
        default_factory=dict, description="Ray runtime_env of every job (a JSON object of finite numbers)")
    runs_dir: Path = Field(Path("runs"), description="where runs/<run_id>/step_<n>/ checkpoints are written")
    spec_dir: Path = Field(Path("runs/_jobs"), description="where each job's resolved spec file is written")

    # Set one limit at a time (FLOWBP_LIMITS_<FIELD>); a FLOWBP_LIMITS string is refused, not decoded.
    limits: Annotated[Limits, NoDecode] = Field(default_factory=Limits)

    host: str = "127.0.0.1"
    log_level: str = Field("info", pattern="^(debug|info|warning|error)$")
    port: int = Field(8000, ge=0, le=65535)

    @field_validator("runtime_env", mode="before")
    @classmethod
    def _finite_json(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                value = json.loads(value, parse_constant=_not_a_number, parse_float=_finite_float)
            except ValueError as e:  # JSONDecodeError is one
                raise ValueError(f"expected a JSON object of finite numbers ({e})") from None
        _check_finite(value)
        return value

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], *, init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource, **_: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Values given in code win over the environment; no .env file or secrets directory is read.
        return init_settings, env_settings

    @classmethod
    def from_env(cls, **overrides: Any) -> ControllerSettings:
        """The settings from the environment, `overrides` taking precedence; a bad value exits naming its variable."""
        try:
            return cls(**overrides)
        except ValidationError as e:
            raise SystemExit(f"bad controller settings: {_problems(e)}") from None
        except SettingsError as e:
            raise SystemExit(f"bad controller settings: {e}") from None


def _problems(error: ValidationError) -> str:
    """`FLOWBP_PORT='x': Input should be a valid integer, ...` for each bad value, joined by '; '."""
    return "; ".join(f"{ENV_PREFIX}{'_'.join(str(p) for p in err['loc']).upper()}={err['input']!r}: {err['msg']}"
                     for err in error.errors())


def _not_a_number(token: str) -> float:
    raise ValueError(f"{token} is not a number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 parses as inf
        raise ValueError(f"{text} is not a finite number")
    return value


def _check_finite(value: Any) -> None:
    """Refuse NaN and +-inf anywhere in a JSON-like value (a value given in code is held to the same rule)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{value} is not a finite number")
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list | tuple) else ()
    for child in children:
        _check_finite(child)


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
