"""Find the metric names a PromQL expression reads (enough of PromQL for our dashboards and alert rules).

Not a parser: it removes what cannot be a metric name (strings, label matchers, range selectors, grouping
label lists, Grafana variables, numbers and durations, keywords) and keeps identifiers that are not called as
functions. The tests hold it to known expressions so that a blind spot shows up as a failing test.
"""

from __future__ import annotations

import re

_KEYWORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left", "group_right",
     "inf", "nan", "Inf", "NaN", "atan2"}
)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_VARIABLE = re.compile(r"\$\{?[A-Za-z_][A-Za-z0-9_]*(?::[A-Za-z_]+)?\}?")
_NUMBER = re.compile(r"(?<![A-Za-z_:])[0-9]+(?:\.[0-9]+)?(?:e[+-]?[0-9]+)?(?:ms|s|m|h|d|w|y)?\b")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def metric_names(expr: str) -> set[str]:
    """Every metric name that `expr` selects, e.g. {"ray_flowbp_reward_mean"}."""
    text = _STRING.sub(" ", expr)
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    text = _VARIABLE.sub(" ", text)
    text = _NUMBER.sub(" ", text)
    names: set[str] = set()
    for match in _IDENT.finditer(text):
        word = match.group(0)
        rest = text[match.end():].lstrip()
        if rest.startswith("("):  # a function or aggregation call
            continue
        if word in _KEYWORDS:
            continue
        names.add(word)
    return names
