"""One error type for bad user input, so every entry point (YAML, CLI, REST) can report it the same way."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is outside what is allowed.

    The message always names the field (dotted path where there is one), the value given, and what is allowed,
    because the person reading it usually did not write the code that raised it.
    """

    def __init__(self, field: str, value: object, allowed: str, hint: str | None = None):
        self.field = field
        self.value = value
        self.allowed = allowed
        msg = f"{field}={value!r} is not allowed: expected {allowed}"
        if hint:
            msg += f" ({hint})"
        super().__init__(msg)


def check_range(field: str, value: float, low: float | None = None, high: float | None = None,
                *, low_open: bool = False, high_open: bool = False) -> None:
    """Raise ConfigError unless low <= value <= high (with optional open ends)."""
    ok = True
    if low is not None:
        ok &= value > low if low_open else value >= low
    if high is not None:
        ok &= value < high if high_open else value <= high
    if not ok:
        lo = "-inf" if low is None else f"{low}"
        hi = "inf" if high is None else f"{high}"
        allowed = f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
        raise ConfigError(field, value, f"a value in {allowed}")
