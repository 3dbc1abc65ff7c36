"""The number rules every run-schema model follows (one place for them): finite numbers only, JSON's types as
written, and a ceiling for numbers without a natural one. `flowbp_core.config` re-exports them."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

# NaN and +-inf are no numbers at all: every model that takes numbers from outside rejects them, as literals
# and as strings. Models that read JSON or YAML also take JSON's types as written (STRICT_NUMBERS): `true` is no
# integer and "3" no number. Each model takes its number rules from here.
FINITE_NUMBERS = ConfigDict(allow_inf_nan=False)
STRICT_NUMBERS = ConfigDict(strict=True, **FINITE_NUMBERS)
# Numbers without a natural ceiling still get one, so a huge value fails here instead of deep in torch or C:
# seeds fit numpy's 32 bits, free floats stay finite in float32 (the dtype the math runs in; a huge but finite
# one, like a LoRA alpha of 1e30, is a run's non-finite steps to skip, not a bad request), and method parameters
# (step counts, scales, fractions) stay within 1e6.
MAX_SEED = 2**32 - 1
FLOAT32_MAX = 3.4028234663852886e38
MAX_METHOD_PARAM = 1e6


class Strict(BaseModel):
    """A schema section: unknown keys and non-JSON types are refused, numbers are finite."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, **STRICT_NUMBERS)
