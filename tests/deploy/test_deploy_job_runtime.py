"""The chart's worker groups and the runtime agree on the role resources and on each role's GPUs, and every job
the chart runs (through the controller or the RayJob template) requests them: the rendered command parses into a
run config with `runtime.role_resources` on, the chart's `runtime.hello_timeout_s`, and per-role GPUs that the
pods of the groups hosting them have room for."""

from __future__ import annotations

import json
import shlex
import string

import pytest
from deploy_helpers import REPO, env_of, load_values, merge_values, one, one_gpu_values, render_docs

helm = pytest.importorskip("helm_python")

RUN_FILE = str(REPO / "deploy" / "configs" / "tiny.yaml")


def _run_config(command: str):
    """The run config `command` (`python -m services.entrypoints.train ...`) would run with."""
    from flowbp_core.config import load_config
    from services.entrypoints.train import parse_args

    words = shlex.split(command)
    assert words[:3] == ["python", "-m", "services.entrypoints.train"], words
    args, overrides = parse_args(words[3:])
    return load_config(args.config, overrides, check_registries=False)


def _controller_command(docs, overrides: str = "") -> str:
    container = one(docs, "Deployment", "-controller")["spec"]["template"]["spec"]["containers"][0]
    entry = env_of(container)["FLOWBP_ENTRYPOINT"]["value"]
    # what services/controller/reconciler.py appends; `overrides` stands in for settings of the run file
    return f"{entry} --config {shlex.quote(RUN_FILE)} {overrides}"


def _rayjob_command(docs, overrides: str = "") -> str:
    template = one(docs, "ConfigMap", "-rayjob-template")["data"]["rayjob.yaml"]
    import yaml

    filled = string.Template(template).substitute(job_id="j1", config=RUN_FILE, overrides=overrides)
    return yaml.safe_load(filled)["spec"]["entrypoint"]


def _provided(group: dict) -> dict:
    # KubeRay passes the value to `ray start --resources` as written: a JSON string inside quotes
    return json.loads(json.loads(group["rayStartParams"]["resources"]))


def _groups(docs) -> dict:
    return {g["groupName"]: g for g in one(docs, "RayCluster")["spec"]["workerGroupSpecs"]}


def test_worker_groups_provide_the_resources_the_runtime_requests(default_docs, gpu_docs):
    from services.runtime.placement import ROLES, role_resource

    for docs in (default_docs, gpu_docs):
        groups = _groups(docs)
        assert sorted(groups) == sorted(ROLES)
        for role in ROLES:
            assert _provided(groups[role]) == {role_resource(role): 1}, role


def test_the_one_gpu_group_provides_every_role(one_gpu_docs):
    from services.runtime.placement import ROLES, role_resource

    [group] = _groups(one_gpu_docs).values()
    assert _provided(group) == {role_resource(role): 1 for role in ROLES}
    assert group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert group["maxReplicas"] == 1


LAYOUTS = {"values.yaml": lambda: {}, "values-gpu.yaml": lambda: load_values("values-gpu.yaml"),
           "values-one-gpu.yaml": one_gpu_values}
# (rollout, learner, reward) GPUs a process takes in each shipped layout
SHARES = {"values.yaml": (0, 0, 0), "values-gpu.yaml": (1, 1, 1), "values-one-gpu.yaml": (0.5, 0.25, 0.25)}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_pod_gpus_cover_what_the_runtime_requests(layout):
    """Each group's pod has the GPUs its hosted processes ask for, computed by the runtime's own `role_gpus` from
    the job's rendered command (a use_gpu run, so rollout and learner take theirs)."""
    from services.runtime.placement import role_gpus

    values = merge_values(load_values("values.yaml"), LAYOUTS[layout]())
    docs = render_docs(LAYOUTS[layout]() or None)
    for command in (_controller_command(docs, "--runtime.use_gpu=true"),
                    _rayjob_command(docs, "--runtime.use_gpu=true --reward.served.num_gpus=3")):
        cfg = _run_config(command)
        asked = {role: role_gpus(cfg, role) for role in ("rollout", "learner", "reward")}
        assert tuple(asked.values()) == SHARES[layout], command
        for name, group in _groups(docs).items():
            hosts = values["ray"]["workerGroups"][name].get("hosts") or {name: 1}
            assert _provided(group) == {f"flowbp_{role}": 1 for role in hosts}, name
            pod_gpus = group["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)
            assert pod_gpus >= sum(n * asked[role] for role, n in hosts.items()), (layout, name, pod_gpus)


def _one_gpu_with(shares: dict) -> dict:
    return merge_values(one_gpu_values(), {"ray": {"jobRuntime": {"roleGpus": shares}}})


def test_a_group_too_small_for_its_processes_fails_naming_the_value():
    with pytest.raises(helm.HelmRenderError) as err:
        render_docs(_one_gpu_with({"learner": 0.5}))
    message = str(err.value)
    assert "ray.workerGroups.rollout.gpus: 1," in message and "take 1.25 GPUs" in message, message
    assert "allowed: at least 2" in message, message
    render_docs(_one_gpu_with({"learner": 0.125, "reward": 0.125}))  # under one card: fits


def test_a_role_without_a_group_fails_while_jobs_request_role_resources():
    values = merge_values(load_values("values-gpu.yaml"), {"ray": {"workerGroups": {"reward": {"enabled": False}}}})
    with pytest.raises(helm.HelmRenderError, match="no enabled group hosts reward"):
        render_docs(values)
    values["ray"]["jobRuntime"] = {"roleResources": False}
    render_docs(values)  # any node with a GPU to spare takes the reward replicas


@pytest.mark.parametrize("shares, field, said", [
    ({"rollout": 1.5}, "/ray/jobRuntime/roleGpus/rollout", "multipleOf"),
    ({"learner": -0.5}, "/ray/jobRuntime/roleGpus/learner", "minimum"),
    ({"reward": 9}, "/ray/jobRuntime/roleGpus/reward", "maximum"),
])
def test_role_gpus_outside_what_ray_allows_fail_the_schema(shares, field, said):
    with pytest.raises(helm.HelmValuesError) as err:
        render_docs({"ray": {"jobRuntime": {"roleGpus": shares}}})
    assert field in str(err.value) and said in str(err.value), str(err.value)


def test_hosts_names_only_roles():
    with pytest.raises(helm.HelmValuesError, match="/ray/workerGroups/rollout/hosts"):
        render_docs({"ray": {"workerGroups": {"rollout": {"hosts": {"trainer": 1}}}}})


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
