"""The one place a dtype name from a config, a command line or a checkpoint becomes a `torch.dtype`."""

from __future__ import annotations

import torch

from flowbp_core.errors import ConfigError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16}


def resolve_dtype(dtype: torch.dtype | str | None, field: str = "backbone.dtype") -> torch.dtype:
    """`None` is float32; a `torch.dtype` passes through; a name (any case, optional `torch.` prefix) is looked up.
    Anything else raises `ConfigError` (a `ValueError`) naming `field`."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.lower().removeprefix("torch.")]
    raise ConfigError(field, dtype, f"a torch dtype or one of {sorted(DTYPES)}")
