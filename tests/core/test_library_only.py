"""flowbp_core is importable code only: command lines live in services/entrypoints (the README's layout table)."""

from __future__ import annotations

import ast
from pathlib import Path

import flowbp_core

LIBRARY = Path(flowbp_core.__file__).resolve().parent


def command_line_parts(source: str) -> list[str]:
    """What makes a module a program: argparse imported, `sys.argv` read, or an `if __name__ == "__main__"` block."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "argparse" for a in node.names):
            found.append((node.lineno, "import argparse"))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "argparse":
            found.append((node.lineno, "from argparse import"))
        elif isinstance(node, ast.Attribute) and node.attr == "argv" and getattr(node.value, "id", None) == "sys":
            found.append((node.lineno, "sys.argv"))
        elif isinstance(node, ast.Compare) and {_name(node.left), *map(_name, node.comparators)} == {"__name__",
                                                                                                   "'__main__'"}:
            found.append((node.lineno, 'if __name__ == "__main__"'))
    return [f"line {line}: {what}" for line, what in sorted(found)]


def _name(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return repr(node.value)
    return None


def test_no_module_of_the_library_is_a_command():
    modules = sorted(LIBRARY.rglob("*.py"))
    assert len(modules) > 50, f"found only {len(modules)} modules under {LIBRARY}"
    offenders = {str(m.relative_to(LIBRARY)): parts for m in modules if (parts := command_line_parts(m.read_text()))}
    assert not [m for m in modules if m.name == "__main__.py"], "a __main__.py makes the package a program"
    assert offenders == {}, f"command-line code in flowbp_core (it belongs in services/entrypoints): {offenders}"


def test_the_check_finds_each_kind_of_command_line():
    program = 'import argparse\nimport sys\nfrom argparse import ArgumentParser\nprint(sys.argv)\n' \
              'if __name__ == "__main__":\n    pass\n'
    assert [p.split(": ")[1] for p in command_line_parts(program)] == [
        "import argparse", "from argparse import", "sys.argv", 'if __name__ == "__main__"']
    assert command_line_parts("import sys\nname = __name__\nprint(sys.path)\n") == []
