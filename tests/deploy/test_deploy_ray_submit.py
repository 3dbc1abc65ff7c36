"""The `ray job submit` path: deploy/ray/runtime_env.yaml is a valid Ray runtime env, and a job submitted with
it to a running cluster (the session's local Ray head) runs the uploaded code, without the excluded folders."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml
from deploy_helpers import REPO

RUNTIME_ENV = REPO / "deploy" / "ray" / "runtime_env.yaml"


def test_runtime_env_is_valid_for_ray():
    from ray.runtime_env import RuntimeEnv

    spec = yaml.safe_load(RUNTIME_ENV.read_text())
    env = RuntimeEnv(**spec)
    assert env["working_dir"] == "."
    assert {".git", ".venv", "runs"} <= set(spec["excludes"])
    assert all(isinstance(v, str) for v in spec["env_vars"].values())


def test_documented_command_matches_the_entrypoint():
    text = (REPO / "deploy" / "README.md").read_text()
    assert "ray job submit" in text and "--runtime-env deploy/ray/runtime_env.yaml" in text
    assert "python -m services.entrypoints.train --config deploy/configs/" in text
    configs = {p.name for p in (REPO / "deploy" / "configs").glob("*.yaml")}
    named = set(__import__("re").findall(r"deploy/configs/([\w.-]+\.yaml)", text))
    assert named and named <= configs, named - configs


PROBE = (
    "import os, sys, flowbp_core, services.runtime.metric_names as m; "
    "print('FLOWBP_PROBE', os.getcwd() != {repo!r}, os.path.exists('.venv'), os.path.exists('runs'), "
    "os.path.exists('flowbp_core/__init__.py'), len(m.ALL), os.environ.get('TOKENIZERS_PARALLELISM'))"
)


@pytest.mark.integration
@pytest.mark.timeout(1200)  # includes starting the session Ray head on a loaded 2-core machine
def test_ray_job_submit_with_the_runtime_env(ray_head):
    ray_cli = Path(sys.executable).with_name("ray")
    submission_id = f"flowbp-deploy-{uuid.uuid4().hex[:8]}"
    result = subprocess.run(
        [str(ray_cli), "job", "submit", "--address", ray_head.dashboard_url, "--submission-id", submission_id,
         "--runtime-env", str(RUNTIME_ENV.relative_to(REPO)), "--", "python", "-c", PROBE.format(repo=str(REPO))],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    [line] = [ln for ln in out.splitlines() if ln.startswith("FLOWBP_PROBE")]
    # runs in the uploaded copy, which holds the code but not the virtualenv or checkpoints
    assert line.split()[1:] == ["True", "False", "False", "True", "15", "false"], line
    assert "succeeded" in out.lower()
