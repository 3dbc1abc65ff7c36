"""ruff finds nothing in the project's Python (rules, line length and exclusions: [tool.ruff] in pyproject.toml), and
no module of the library or the services is longer than a reader can hold (MAX_MODULE_LINES)."""

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
