"""A command line from an options dataclass: each field is a `--flag` with the field's type, default and help
(`field(metadata={"help": ...})`), so a knob's name, default and range live once, in the library's dataclass.

The dataclass checks its own values (`__post_init__` raising ConfigError); a bad value ends the command with
argparse's usage error naming the field, the value and what is allowed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from flowbp_core.errors import ConfigError

T = TypeVar("T")


def parser_for(options: type, prog: str, doc: str | None) -> argparse.ArgumentParser:
    """An ArgumentParser with one `--field-name` per field of the dataclass `options`."""
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(options)
    for f in dataclasses.fields(options):
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, **_argument(hints[f.name], f))
    return p


def parse_options(options: type[T], argv: Sequence[str] | None, prog: str, doc: str | None) -> T:
    """The dataclass built from `argv` (sys.argv when None); exits with a usage error on a bad flag or value."""
    p = parser_for(options, prog, doc)
    a = p.parse_args(argv)
    try:
        return options(**vars(a))
    except ConfigError as e:
        p.error(str(e))


def _argument(hint: Any, f: dataclasses.Field) -> dict[str, Any]:
    kw: dict[str, Any] = {"help": f.metadata.get("help")}
    if f.default is not dataclasses.MISSING:
        kw["default"] = f.default
    elif f.default_factory is not dataclasses.MISSING:
        kw["default"] = f.default_factory()
    else:
        kw["required"] = True
    if hint is bool:
        if kw.get("default", False):
            raise TypeError(f"{f.name}: a flag defaults to False (name the field for the switch that turns it on)")
        return {**kw, "action": "store_true"}
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        hint = args[0]  # X | None: the flag takes an X, its absence is None
    if typing.get_origin(hint) is list:
        return {**kw, "type": typing.get_args(hint)[0], "nargs": "*"}
    if typing.get_origin(hint) is typing.Literal:
        return {**kw, "choices": typing.get_args(hint)}
    if hint in (int, float, str, Path):
        return {**kw, "type": hint}
    raise TypeError(f"{f.name}: no command-line form for {hint}")


def command_line(prog: str, argv: Sequence[str] | None) -> str:
    """The command as typed, for a checkpoint's provenance (`prog` is its `python -m ...` form)."""
    return " ".join([prog, *(sys.argv[1:] if argv is None else argv)])


def options_command(options: type[T], run: Callable[..., object], *, module: str, doc: str | None,
                    provenance: bool = True, report: bool = False) -> Callable[[Sequence[str] | None], int]:
    """The `main(argv)` of `python -m <module>`, a command whose flags are the fields of `options`: it parses them
    and calls `run(options, command line as typed)` (`run(options)` without `provenance`, for a run that keeps no
    provenance); with `report` it prints what `run` returns as JSON. Exit status 0."""
    prog = f"python -m {module}"

    def main(argv: Sequence[str] | None = None) -> int:
        opts = parse_options(options, argv, prog, doc)
        out = run(opts, command_line(prog, argv)) if provenance else run(opts)
        if report:
            print(json.dumps(out))
        return 0

    return main
