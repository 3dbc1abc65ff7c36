"""ruff finds nothing in the project's Python (rules, line length and exclusions: [tool.ruff] in pyproject.toml), and
no module of the library or the services is longer than a reader can hold (MAX_MODULE_LINES), and packages import
in one direction only (ONE_WAY)."""

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PATHS = ["flowbp_core", "services", "benchmarks", "k8s", "tests", "deploy"]
# A module past this is split along a seam of what it does (style.md: folders once a file passes ~400 lines).
MAX_MODULE_LINES = 400


def test_ruff_finds_nothing():
    if importlib.util.find_spec("ruff") is None:
        pytest.skip("ruff is not installed (it is pinned in requirements.txt; `make test` installs it)")
    paths = [p for p in PATHS if (ROOT / p).is_dir()]
    assert paths, f"none of {PATHS} under {ROOT}"
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", *paths],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"ruff check {' '.join(paths)} (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}"


def test_no_module_over_max_lines():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines())
             for package in ("flowbp_core", "services") for p in sorted((ROOT / package).rglob("*.py"))}
    assert len(sizes) > 50, f"found only {len(sizes)} modules under flowbp_core/ and services/"
    too_long = {path: n for path, n in sizes.items() if n > MAX_MODULE_LINES}
    assert not too_long, f"modules over {MAX_MODULE_LINES} lines (split each along a seam): {too_long}"


# (package, what it must not import, why): the other package imports it, not back
ONE_WAY = [
    ("services/reward_serve", "services.runtime", "the runtime deploys the reward service"),
    ("flowbp_core/world", "flowbp_core.backbones", "the embedded backbone wraps the world's model"),
]


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
    return out


@pytest.mark.parametrize(("package", "forbidden", "why"), ONE_WAY, ids=[p for p, _, _ in ONE_WAY])
def test_packages_import_one_way(package, forbidden, why):
    files = sorted((ROOT / package).rglob("*.py"))
    assert len(files) > 3, f"found only {len(files)} modules under {package}"
    bad = {str(f.relative_to(ROOT)): sorted(m for m in imported_modules(f) if m.startswith(forbidden)) for f in files}
    assert not {k: v for k, v in bad.items() if v}, f"{package} imports {forbidden} ({why}: not back)"
