"""The chart's worker groups and the runtime agree on the role resources, and every job the chart runs (through
the controller or the RayJob template) requests them: the rendered command parses into a run config with
`runtime.role_resources` on and the chart's `runtime.hello_timeout_s`."""

from __future__ import annotations

import json
import shlex
import string

import pytest
from deploy_helpers import REPO, env_of, one, render_docs

pytest.importorskip("helm_python")

RUN_FILE = str(REPO / "deploy" / "configs" / "tiny.yaml")


def _run_config(command: str):
    """The run config `command` (`python -m services.entrypoints.train ...`) would run with."""
    from flowbp_core.config import load_config
    from services.entrypoints.train import parse_args

    words = shlex.split(command)
    assert words[:3] == ["python", "-m", "services.entrypoints.train"], words
    args, overrides = parse_args(words[3:])
    return load_config(args.config, overrides, check_registries=False)


def _controller_command(docs) -> str:
    container = one(docs, "Deployment", "-controller")["spec"]["template"]["spec"]["containers"][0]
    entry = env_of(container)["FLOWBP_ENTRYPOINT"]["value"]
    return f"{entry} --config {shlex.quote(RUN_FILE)}"  # what services/controller/reconciler.py appends


def _rayjob_command(docs, overrides: str = "") -> str:
    template = one(docs, "ConfigMap", "-rayjob-template")["data"]["rayjob.yaml"]
    import yaml

    filled = string.Template(template).substitute(job_id="j1", config=RUN_FILE, overrides=overrides)
    return yaml.safe_load(filled)["spec"]["entrypoint"]


def test_worker_groups_provide_the_resources_the_runtime_requests(default_docs, gpu_docs):
    from services.runtime.placement import ROLES, role_resource

    for docs in (default_docs, gpu_docs):
        groups = {g["groupName"]: g for g in one(docs, "RayCluster")["spec"]["workerGroupSpecs"]}
        assert sorted(groups) == sorted(ROLES)
        for role in ROLES:
            # KubeRay passes the value to `ray start --resources` as written: a JSON string inside quotes
            provided = json.loads(json.loads(groups[role]["rayStartParams"]["resources"]))
            assert provided == {role_resource(role): 1}, (role, provided)


def test_every_job_of_the_chart_requests_its_role_resources(default_docs, gpu_docs):
    for docs in (default_docs, gpu_docs):
        for command in (_controller_command(docs), _rayjob_command(docs, "--runtime.role_resources=false")):
            rt = _run_config(command).runtime
            assert rt.role_resources is True and rt.hello_timeout_s == 1800, command


def test_the_switch_and_the_timeout_come_from_values():
    docs = render_docs({"ray": {"jobRuntime": {"roleResources": False, "helloTimeoutSeconds": 120}}})
    for command in (_controller_command(docs), _rayjob_command(docs)):
        rt = _run_config(command).runtime
        assert rt.role_resources is False and rt.hello_timeout_s == 120, command
