"""The Helm chart lints strictly and every object it renders is valid, with each shipped values file."""

from __future__ import annotations

import jsonschema
import pytest
from deploy_helpers import (CHART, by_kind, env_of, is_custom, load_values, one, pod_templates, render_docs,
                            validate_core, validate_custom)

helm = pytest.importorskip("helm_python")

EXPECTED_KINDS = {
    "Deployment", "Service", "StatefulSet", "Secret", "ServiceAccount", "ConfigMap", "PersistentVolumeClaim",
    "NetworkPolicy", "RayCluster", "ServiceMonitor", "PodMonitor", "PrometheusRule", "PodDisruptionBudget",
}


@pytest.mark.parametrize("values_file", ["values.yaml", "values-gpu.yaml"])
def test_lint_strict_passes(values_file):
    values = None if values_file == "values.yaml" else load_values(values_file)
    report = helm.lint(str(CHART), values, strict=True, kube_version="v1.30.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # 2 warning, 3 error
    assert report["errors"] == [] and problems == [], report


def test_lint_catches_a_broken_template(tmp_path):
    """The lint is a real check: a template that does not parse is reported."""
    import shutil

    broken = tmp_path / "flowbp"
    shutil.copytree(CHART, broken)
    (broken / "templates" / "broken.yaml").write_text("kind: ConfigMap\n{{ .Values.nope.deeper }}\n")
    report = helm.lint(str(broken), strict=True)
    assert report["errors"] or any(m["severity"] >= 2 for m in report["messages"])


def test_every_expected_kind_is_rendered(rendered):
    _, docs = rendered
    assert EXPECTED_KINDS <= {d["kind"] for d in docs}


def test_core_objects_pass_kubernetes_validate_strict(rendered):
    name, docs = rendered
    core = [d for d in docs if not is_custom(d)]
    assert len(core) >= 10
    for doc in core:
        try:
            validate_core(doc)
        except Exception as e:
            raise AssertionError(f"{name}: {doc['kind']}/{doc['metadata']['name']}: {e}") from e


def test_custom_resources_match_the_kuberay_and_prometheus_operator_fields(rendered):
    _, docs = rendered
    custom = [d for d in docs if is_custom(d)]
    assert {d["kind"] for d in custom} == {"RayCluster", "ServiceMonitor", "PodMonitor", "PrometheusRule"}
    for doc in custom:
        validate_custom(doc)


def test_the_reward_service_when_turned_on_is_valid(reward_docs):
    [service] = by_kind(reward_docs, "RayService")
    validate_custom(service)


def test_custom_resource_schema_rejects_a_misspelt_field(default_docs):
    import copy

    cluster = copy.deepcopy(one(default_docs, "RayCluster"))
    cluster["spec"]["workerGroupSpecs"][0]["minReplica"] = 0  # missing "s"
    with pytest.raises(jsonschema.ValidationError, match="minReplica"):
        validate_custom(cluster)
    cluster = copy.deepcopy(one(default_docs, "RayCluster"))
    cluster["spec"]["workerGroupSpecs"][0]["rayStartParams"]["num-gpus"] = 1  # must be a string
    with pytest.raises(jsonschema.ValidationError):
        validate_custom(cluster)


def test_pod_templates_inside_kuberay_objects_are_checked(default_docs):
    import copy

    cluster = copy.deepcopy(one(default_docs, "RayCluster"))
    cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = 7
    with pytest.raises(jsonschema.ValidationError) as err:
        validate_custom(cluster)
    assert "headGroupSpec" in err.value.absolute_path
    cluster = copy.deepcopy(one(default_docs, "RayCluster"))
    cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolicie"] = "Always"
    with pytest.raises(jsonschema.ValidationError, match="imagePullPolicie"):
        validate_custom(cluster)


def test_gpu_values_give_each_role_its_gpu_group_scaling_from_zero(gpu_docs, reward_docs):
    cluster = one(gpu_docs, "RayCluster")
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True and spec["autoscalerOptions"]["version"] == "v2"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"rollout", "learner", "reward"}
    for role, group in groups.items():
        assert group["minReplicas"] == 0 and group["replicas"] == 0 and group["maxReplicas"] >= 1
        pod = group["template"]["spec"]
        limits = pod["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1, role
        assert any(t.get("key") == "nvidia.com/gpu" for t in pod["tolerations"]), role
        # Actors choose their group through this custom resource.
        assert group["rayStartParams"]["resources"] == f'"{{\\"flowbp_{role}\\":1}}"'
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["limits"]
    service = one(reward_docs, "RayService")
    workers = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert [w["groupName"] for w in workers] == ["reward"]
    assert int(workers[0]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert workers[0]["minReplicas"] == 0


def test_default_values_need_no_gpu(default_docs):
    for doc in by_kind(default_docs, "RayCluster") + by_kind(default_docs, "RayService"):
        for _, template in pod_templates(doc):
            assert "nvidia.com/gpu" not in template["spec"]["containers"][0]["resources"]["limits"]


def test_redis_is_a_statefulset_with_a_volume_and_an_append_only_file(default_docs):
    redis = one(default_docs, "StatefulSet", "-redis")
    container = redis["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--dir") + 1] == "/data"
    [claim] = redis["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data"
    assert any(m["name"] == "data" and m["mountPath"] == "/data" for m in container["volumeMounts"])
    controller = one(default_docs, "Deployment", "-controller")
    env = env_of(controller["spec"]["template"]["spec"]["containers"][0])
    assert env["FLOWBP_REDIS_URL"]["value"] == "redis://:$(REDIS_PASSWORD)@flowbp-redis.flowbp.svc:6379/0"
    # $(REDIS_PASSWORD) expands only to a variable defined before it
    names = [e["name"] for e in controller["spec"]["template"]["spec"]["containers"][0]["env"]]
    assert names.index("REDIS_PASSWORD") < names.index("FLOWBP_REDIS_URL")


def test_external_redis_comes_from_a_secret():
    docs = render_docs({"redis": {"enabled": False, "external": {"existingSecret": "my-redis", "secretKey": "url"}}})
    assert not by_kind(docs, "StatefulSet")
    assert not [d for d in by_kind(docs, "NetworkPolicy") if d["metadata"]["name"].endswith("-redis")]
    env = env_of(one(docs, "Deployment", "-controller")["spec"]["template"]["spec"]["containers"][0])
    assert env["FLOWBP_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": "my-redis", "key": "url"}


def test_tokens_are_generated_once_and_the_operator_hands_the_ray_token_to_every_ray_pod(reward_docs):
    import base64

    secret = one(reward_docs, "Secret", "-tokens")
    api, ray, redis = (base64.b64decode(secret["data"][k]).decode() for k in ("api-token", "auth_token",
                                                                               "redis-password"))
    assert len(api) == 48 and len(ray) == 48 and len(redis) == 32 and len({api, ray, redis}) == 3
    controller = one(reward_docs, "Deployment", "-controller")["spec"]["template"]["spec"]
    env = env_of(controller["containers"][0])
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "flowbp-tokens", "key": "auth_token"}
    ray_objects = by_kind(reward_docs, "RayCluster") + by_kind(reward_docs, "RayService")
    assert len(ray_objects) == 2
    for doc in ray_objects:
        spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterConfig"]
        # KubeRay injects RAY_AUTH_* into every Ray container and sends the token on its own calls
        assert spec["authOptions"] == {"mode": "token", "secretName": "flowbp-tokens"}, doc["kind"]
        for _, template in pod_templates(doc):
            assert not {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} & set(env_of(template["spec"]["containers"][0]))


def test_an_existing_secret_replaces_the_generated_one():
    docs = render_docs({"auth": {"existingSecret": "site-tokens", "rayAuthMode": "disabled"}})
    assert not by_kind(docs, "Secret")
    pod = one(docs, "Deployment", "-controller")["spec"]["template"]["spec"]
    assert pod["volumes"][0]["secret"]["secretName"] == "site-tokens"
    env = env_of(pod["containers"][0])
    assert env["RAY_AUTH_MODE"]["value"] == "disabled" and "RAY_AUTH_TOKEN" not in env
    assert one(docs, "RayCluster")["spec"]["authOptions"] == {"mode": "disabled"}


def test_ingress_is_optional_and_valid():
    docs = render_docs({"controller": {"ingress": {"enabled": True, "className": "nginx", "host": "flowbp.example.org",
                                                   "tls": {"enabled": True, "secretName": "flowbp-tls"}}}})
    ingress = one(docs, "Ingress", "-controller")
    validate_core(ingress)
    assert ingress["spec"]["rules"][0]["host"] == "flowbp.example.org"
    assert ingress["spec"]["tls"][0]["secretName"] == "flowbp-tls"


def test_network_policies_keep_redis_to_the_controller(default_docs):
    policies = {d["metadata"]["name"]: d for d in by_kind(default_docs, "NetworkPolicy")}
    assert set(policies) == {"flowbp-controller", "flowbp-redis", "flowbp-ray"}
    [rule] = policies["flowbp-redis"]["spec"]["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": {
        "app.kubernetes.io/name": "flowbp", "app.kubernetes.io/instance": "flowbp",
        "app.kubernetes.io/component": "controller"}}}]
    # Every Ray pod carries the label the Ray policy and the PodMonitor select on.
    for doc in by_kind(default_docs, "RayCluster") + by_kind(default_docs, "RayService"):
        for _, template in pod_templates(doc):
            assert template["metadata"]["labels"]["flowbp.io/ray-pod"] == "true"


def test_monitoring_objects_scrape_the_ports_that_exist(default_docs):
    service = one(default_docs, "Service", "-controller")
    monitor = one(default_docs, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    pod_monitor = one(default_docs, "PodMonitor")
    port = pod_monitor["spec"]["podMetricsEndpoints"][0]["port"]
    for doc in by_kind(default_docs, "RayCluster") + by_kind(default_docs, "RayService"):
        spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterConfig"]
        for params in [spec["headGroupSpec"]["rayStartParams"]] + [g["rayStartParams"] for g in
                                                                  spec["workerGroupSpecs"]]:
            assert params["metrics-export-port"] == "8080"
        for _, template in pod_templates(doc):
            ports = {p["name"]: p["containerPort"] for p in template["spec"]["containers"][0]["ports"]}
            assert ports[port] == 8080


def test_chart_ships_the_dashboards_and_rules_from_deploy(default_docs):
    import json

    from deploy_helpers import REPO

    dashboards = one(default_docs, "ConfigMap", "-dashboards")
    assert dashboards["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = {name: json.loads(text) for name, text in dashboards["data"].items()}
    on_disk = {p.name: json.loads(p.read_text()) for p in (REPO / "deploy" / "grafana").glob("*.json")}
    assert shipped == on_disk and set(shipped) == {"job-overview.json", "system.json"}
    import yaml

    rule = one(default_docs, "PrometheusRule")
    assert rule["spec"] == yaml.safe_load((REPO / "deploy" / "prometheus" / "flowbp-alerts.yaml").read_text())


def test_monitoring_can_be_turned_off_for_clusters_without_the_operator():
    docs = render_docs({"monitoring": {"serviceMonitor": {"enabled": False}, "podMonitor": {"enabled": False},
                                       "prometheusRule": {"enabled": False}, "dashboards": {"enabled": False,
                                                                                            "labels": {}}}})
    assert not [d for d in docs if d["apiVersion"].startswith("monitoring.coreos.com/")]
    assert not [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-dashboards")]
