"""Small validators that raise ConfigError with the dotted field name and the allowed range."""

from __future__ import annotations

from typing import Any, Sequence

from flowbp_core.errors import ConfigError, check_range


def in_range(name: str, value: float, low: float | None = None, high: float | None = None, **kw: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"method.{name}", value, "a number")
    check_range(f"method.{name}", float(value), low, high, **kw)


def integer(name: str, value: Any, low: int | None = None, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"method.{name}", value, "an integer")
    if (low is not None and value < low) or (high is not None and value > high):
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise ConfigError(f"method.{name}", value, f"an integer in [{lo}, {hi}]")


def one_of(name: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        raise ConfigError(f"method.{name}", value, f"one of {list(allowed)}")


def k_within(k: int, n_steps: int, field: str = "k") -> None:
    integer("n_steps", n_steps)  # a method parameter too, so it may arrive as anything
    if k > n_steps:
        raise ConfigError(f"method.{field}", k, f"an integer in [1, N={n_steps}] (at most the number of steps)")


def boolean(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, bool):
        raise ConfigError(f"method.{name}", value, "true or false" + (" (or unset)" if allow_none else ""))
