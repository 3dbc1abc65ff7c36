"""ruff finds nothing in the project's Python (rules, line length and exclusions: [tool.ruff] in pyproject.toml)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PATHS = ["flowbp_core", "services", "benchmarks", "k8s", "tests", "deploy"]


def test_ruff_finds_nothing():
    if importlib.util.find_spec("ruff") is None:
        pytest.skip("ruff is not installed (it is pinned in requirements.txt; `make test` installs it)")
    paths = [p for p in PATHS if (ROOT / p).is_dir()]
    assert paths, f"none of {PATHS} under {ROOT}"
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", *paths],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"ruff check {' '.join(paths)} (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}"
