"""The chart on a real KubeRay cluster (issue 19): what the operator needs from each object, asserted on the render."""

from __future__ import annotations

import base64
import hashlib
import shutil

import pytest
import yaml
from deploy_helpers import (
    CHART,
    NAMESPACE,
    RELEASE,
    by_kind,
    env_of,
    load_values,
    one,
    pod_templates,
    render_docs,
)

from k8s import kuberay_crds

helm = pytest.importorskip("helm_python")

FULL = {"rewardService": {"enabled": True}, "ray": {"gcsFaultTolerance": {"enabled": True}},
        "rayJobTemplate": {"submissionMode": "K8sJobMode"}}


@pytest.fixture(scope="module")
def full_docs() -> list[dict]:
    """Every optional Ray object on: the reward RayService, GCS fault tolerance, K8sJobMode submitters."""
    return render_docs(FULL)


def ray_specs(docs: list[dict]) -> list[tuple[dict, dict]]:
    """(object, its RayCluster spec) for every Ray cluster the operator drives."""
    out = [(d, d["spec"]) for d in by_kind(docs, "RayCluster")]
    return out + [(d, d["spec"]["rayClusterConfig"]) for d in by_kind(docs, "RayService")]


def rayjob(docs: list[dict]) -> dict:
    text = one(docs, "ConfigMap", "-rayjob-template")["data"]["rayjob.yaml"]
    return yaml.safe_load(text.replace("${job_id}", "j-1").replace("${config}", "c.yaml").replace("${overrides}", ""))


def secret_data(docs: list[dict]) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in one(docs, "Secret", "-tokens")["data"].items()}


def test_the_minimum_kuberay_is_the_one_whose_schemas_we_validate_against():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    version = kuberay_crds.MIN_KUBERAY.lstrip("v")
    assert f"KubeRay >= {version}" in chart["description"] and f"KubeRay >= {version}" in \
        chart["annotations"]["flowbp.io/requires"]
    # authOptions.secretName (one Secret shared with the controller) is what makes 1.6.0 the floor
    auth = kuberay_crds.schema("RayCluster")["properties"]["spec"]["properties"]["authOptions"]
    assert {"mode", "secretName"} <= set(auth["properties"])
    readme = (kuberay_crds.SCHEMAS / "README.md").read_text()
    assert f"KubeRay {kuberay_crds.MIN_KUBERAY} (commit" in readme


def test_every_ray_cluster_the_operator_drives_has_auth_options(full_docs):
    pairs = ray_specs(full_docs)
    assert [d["kind"] for d, _ in pairs] == ["RayCluster", "RayService"]
    secret = one(full_docs, "Secret", "-tokens")
    for doc, spec in pairs:
        assert spec["authOptions"] == {"mode": "token", "secretName": secret["metadata"]["name"]}, doc["kind"]
        assert tuple(int(x) for x in spec["rayVersion"].split(".")) >= (2, 52, 0)  # KubeRay's floor for token auth
    # KubeRay reads the token from this key of the named Secret
    assert len(secret_data(full_docs)["auth_token"]) == 48
    # a RayJob runs on the standing cluster, whose authOptions the operator applies to the job API and submitter
    assert rayjob(full_docs)["spec"]["clusterSelector"] == {"ray.io/cluster": one(full_docs, "RayCluster")[
        "metadata"]["name"]}


def test_the_ray_policy_admits_the_operator_and_rayjob_submitters(full_docs):
    policy = one(full_docs, "NetworkPolicy", "-ray")
    operator = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kuberay-system"}}}
    rules = [r for r in policy["spec"]["ingress"] if operator in r["from"]]
    assert len(rules) == 1 and {p["port"] for p in rules[0]["ports"]} == {8265, 8000}
    submitter_labels = rayjob(full_docs)["spec"]["submitterPodTemplate"]["metadata"]["labels"]
    admitted = [r for r in policy["spec"]["ingress"] for f in r["from"]
                if "podSelector" in f and f["podSelector"]["matchLabels"].items() <= submitter_labels.items()
                and "namespaceSelector" not in f]
    assert [{p["port"] for p in r["ports"]} for r in admitted] == [{8265}]
    # the operator namespace is a value
    docs = render_docs({"networkPolicy": {"operatorNamespace": "ray-system"}})
    text = yaml.safe_dump(one(docs, "NetworkPolicy", "-ray"))
    assert "kubernetes.io/metadata.name: ray-system" in text


def test_the_submitter_pod_passes_restricted_pod_security(full_docs):
    spec = rayjob(full_docs)["spec"]["submitterPodTemplate"]["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    container = spec["containers"][0]["securityContext"]
    assert container["allowPrivilegeEscalation"] is False and container["capabilities"]["drop"] == ["ALL"]


def test_the_service_monitor_sends_the_api_token_and_the_scrape_job_is_the_alerts(default_docs):
    monitor = one(default_docs, "ServiceMonitor")
    [endpoint] = monitor["spec"]["endpoints"]
    credentials = endpoint["authorization"]["credentials"]
    assert endpoint["authorization"]["type"] == "Bearer"
    assert credentials == {"name": "flowbp-tokens", "key": "api-token"} and "api-token" in secret_data(default_docs)
    service = one(default_docs, "Service", "-controller")
    job = service["metadata"]["labels"][monitor["spec"]["jobLabel"]]
    rules = yaml.safe_load((CHART / "files" / "flowbp-alerts.yaml").read_text())
    [down] = [r for g in rules["groups"] for r in g["rules"] if r.get("alert") == "FlowBPControllerScrapeDown"]
    assert down["expr"].strip() == f'up{{job="{job}"}} == 0'


def test_monitoring_objects_carry_the_label_prometheus_selects_by(default_docs):
    for kind in ("ServiceMonitor", "PodMonitor", "PrometheusRule"):
        assert one(default_docs, kind)["metadata"]["labels"]["release"] == "kube-prometheus-stack", kind
    docs = render_docs({"monitoring": {"labels": {"prometheus": "main"}, "podMonitor": {"labels": {"team": "ml"}}}})
    labels = one(docs, "PodMonitor")["metadata"]["labels"]
    assert labels["prometheus"] == "main" and labels["team"] == "ml"


def test_autoscaler_and_dashboard_metrics_are_scraped_on_ports_the_head_has(full_docs):
    endpoints = {e["port"] for e in one(full_docs, "PodMonitor")["spec"]["podMetricsEndpoints"]}
    assert {"metrics", "as-metrics", "dash-metrics"} <= endpoints
    policy = one(full_docs, "NetworkPolicy", "-ray")
    scraped = {p["port"] for r in policy["spec"]["ingress"] for f in r["from"]
               if f.get("namespaceSelector", {}).get("matchLabels", {}).get("kubernetes.io/metadata.name")
               == "monitoring" for p in r["ports"]}
    for doc, spec in ray_specs(full_docs):
        ports = {p["name"]: p["containerPort"] for p in spec["headGroupSpec"]["template"]["spec"]["containers"][0][
            "ports"]}
        assert {ports[name] for name in endpoints} <= scraped, doc["kind"]


def test_upgrades_recreate_ray_pods_and_a_chart_bump_alone_changes_no_pod(full_docs, tmp_path):
    cluster = one(full_docs, "RayCluster")
    assert cluster["spec"]["upgradeStrategy"] == {"type": "Recreate"}
    service = one(full_docs, "RayService")["spec"]
    assert service["upgradeStrategy"] == {"type": "NewCluster"}
    # KubeRay refuses a cluster-level upgradeStrategy on a cluster a RayService makes
    assert "upgradeStrategy" not in service["rayClusterConfig"]
    for doc, _ in ray_specs(full_docs):
        for where, template in pod_templates(doc):
            labels = template["metadata"]["labels"]
            assert "helm.sh/chart" not in labels and "app.kubernetes.io/version" not in labels, where
    # the same release with the chart and app version bumped: KubeRay sees the same cluster spec
    bumped = tmp_path / "flowbp"
    shutil.copytree(CHART, bumped)
    meta = yaml.safe_load((bumped / "Chart.yaml").read_text())
    meta.update(version="9.9.9", appVersion="9.9.9")
    (bumped / "Chart.yaml").write_text(yaml.safe_dump(meta))
    from k8s.render import render_chart

    values = dict(FULL, auth={"apiToken": "a" * 40, "rayToken": "r" * 40, "redisPassword": "p" * 20})
    specs = []
    for chart in (CHART, bumped):
        docs = [d for text in render_chart(chart, values).values() for d in yaml.safe_load_all(text) if d]
        specs.append([spec for _, spec in ray_specs(docs)])
    assert specs[0] == specs[1]
    with helm.Chart.load(str(bumped)) as c:
        assert "9.9.9" in c.render(values, name=RELEASE, namespace=NAMESPACE)["flowbp/templates/raycluster.yaml"]


def test_gpu_pods_select_no_label_that_appears_only_after_a_node_joins(gpu_docs):
    for _, spec in ray_specs(gpu_docs):
        for group in spec["workerGroupSpecs"]:
            selector = group["template"]["spec"].get("nodeSelector", {})
            assert not [k for k in selector if k.startswith(("nvidia.com/gpu.", "feature.node.kubernetes.io/"))]
    # a node-group label, when given, goes to the GPU pods only
    values = load_values("values-gpu.yaml")
    values["ray"]["gpuNodeSelector"] = {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    cluster = one(render_docs(values), "RayCluster")
    assert "nodeSelector" not in cluster["spec"]["headGroupSpec"]["template"]["spec"]
    for group in cluster["spec"]["workerGroupSpecs"]:
        assert group["template"]["spec"]["nodeSelector"] == values["ray"]["gpuNodeSelector"]


def test_pods_without_a_gpu_see_none(gpu_docs):
    for doc, _ in ray_specs(gpu_docs):
        for where, template in pod_templates(doc):
            container = template["spec"]["containers"][0]
            gpus = int(container["resources"]["limits"].get("nvidia.com/gpu", 0))
            visible = env_of(container).get("NVIDIA_VISIBLE_DEVICES", {}).get("value")
            assert visible == (None if gpus else "void"), where


def test_gcs_fault_tolerance_is_rendered_when_enabled(default_docs, full_docs):
    assert "gcsFaultToleranceOptions" not in one(default_docs, "RayCluster")["spec"]
    options = one(full_docs, "RayCluster")["spec"]["gcsFaultToleranceOptions"]
    assert options == {"redisAddress": "flowbp-redis.flowbp.svc:6379",
                       "redisPassword": {"valueFrom": {"secretKeyRef": {"name": "flowbp-tokens",
                                                                         "key": "redis-password"}}},
                       "externalStorageNamespace": "flowbp-gcs"}
    # the head (and KubeRay's cleanup job, built from the head's template) may reach Redis
    head_labels = one(full_docs, "RayCluster")["spec"]["headGroupSpec"]["template"]["metadata"]["labels"]
    [rule] = one(full_docs, "NetworkPolicy", "-redis")["spec"]["ingress"]
    assert any(f["podSelector"]["matchLabels"].items() <= head_labels.items() for f in rule["from"])
    [rule] = one(default_docs, "NetworkPolicy", "-redis")["spec"]["ingress"]
    assert not any(f["podSelector"]["matchLabels"].items() <= head_labels.items() for f in rule["from"])
    external = render_docs({"ray": {"gcsFaultTolerance": {
        "enabled": True, "redisAddress": "redis.infra:6379", "externalStorageNamespace": "team-a",
        "redisPasswordSecret": {"name": "infra-redis", "key": "password"}}}})
    options = one(external, "RayCluster")["spec"]["gcsFaultToleranceOptions"]
    assert options["redisAddress"] == "redis.infra:6379" and options["externalStorageNamespace"] == "team-a"
    assert options["redisPassword"]["valueFrom"]["secretKeyRef"] == {"name": "infra-redis", "key": "password"}
    with pytest.raises(Exception, match="ray.gcsFaultTolerance.redisAddress: required"):
        render_docs({"ray": {"gcsFaultTolerance": {"enabled": True}},
                     "redis": {"enabled": False, "external": {"existingSecret": "my-redis"}}})


def test_heads_are_protected_from_disruption(full_docs):
    budgets = by_kind(full_docs, "PodDisruptionBudget")
    for doc, spec in ray_specs(full_docs):
        head = spec["headGroupSpec"]["template"]
        matching = [b for b in budgets if b["spec"]["selector"]["matchLabels"].items()
                    <= head["metadata"]["labels"].items()]
        assert len(matching) == 1 and matching[0]["spec"]["maxUnavailable"] == 0, doc["kind"]
        for where, template in pod_templates(doc):
            annotations = template["metadata"]["annotations"]
            assert annotations["cluster-autoscaler.kubernetes.io/safe-to-evict"] == "false", where
            assert annotations["karpenter.sh/do-not-disrupt"] == "true", where
        # no budget selects a worker: the autoscaler's own scale-down must stay free
        for group in spec["workerGroupSpecs"]:
            labels = group["template"]["metadata"]["labels"].items()
            assert not [b for b in budgets if b["spec"]["selector"]["matchLabels"].items() <= labels]
    docs = render_docs({"ray": {"disruption": {"podDisruptionBudget": False, "doNotEvict": False,
                                               "priorityClassName": "flowbp-head"}}})
    assert not by_kind(docs, "PodDisruptionBudget")
    cluster = one(docs, "RayCluster")["spec"]
    assert cluster["headGroupSpec"]["template"]["spec"]["priorityClassName"] == "flowbp-head"
    assert "karpenter.sh/do-not-disrupt" not in cluster["headGroupSpec"]["template"]["metadata"]["annotations"]


def test_the_autoscaler_sidecar_passes_restricted_pod_security(full_docs):
    for doc, spec in ray_specs(full_docs):
        context = spec["autoscalerOptions"]["securityContext"]
        assert context["allowPrivilegeEscalation"] is False and context["capabilities"]["drop"] == ["ALL"], doc
        assert context["runAsNonRoot"] is True and context["seccompProfile"] == {"type": "RuntimeDefault"}


def test_the_shared_volume_is_chowned_only_on_a_root_mismatch(full_docs):
    pods = [one(full_docs, "Deployment", "-controller")["spec"]["template"]]
    pods += [t for doc, _ in ray_specs(full_docs) for _, t in pod_templates(doc)]
    assert len(pods) == 1 + 4 + 2
    for pod in pods:
        assert pod["spec"]["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"


def parse_quantity(text: str) -> int:
    """Bytes of a Kubernetes quantity the chart writes (a plain number or a binary suffix)."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    return int(text[:-2]) * units[text[-2:]] if text[-2:] in units else int(text)


def test_shm_has_headroom_over_the_object_store_and_fits_in_the_pod(gpu_docs):
    values = load_values("values-gpu.yaml")["ray"]
    cluster = one(gpu_docs, "RayCluster")
    groups = [("head", cluster["spec"]["headGroupSpec"])] + [(g["groupName"], g) for g in
                                                             cluster["spec"]["workerGroupSpecs"]]
    for name, group in groups:
        store = int(group["rayStartParams"]["object-store-memory"])
        [shm] = [v for v in group["template"]["spec"]["volumes"] if v["name"] == "dshm"]
        limit = parse_quantity(shm["emptyDir"]["sizeLimit"])
        memory = parse_quantity(group["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"])
        spec = values["head"] if name == "head" else values["workerGroups"][name]
        assert store == int(spec["objectStoreMemory"])
        assert limit == store * 125 // 100 and limit < memory, name


def test_redis_has_a_password_a_memory_cap_and_no_open_mode(default_docs):
    redis = one(default_docs, "StatefulSet", "-redis")["spec"]["template"]
    container = redis["spec"]["containers"][0]
    args, env = container["args"], env_of(container)
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)" and "--protected-mode" not in args
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction" and args[args.index("--maxmemory") + 1]
    for name in ("REDIS_PASSWORD", "REDISCLI_AUTH"):  # the server, and redis-cli in the probes
        assert env[name]["valueFrom"]["secretKeyRef"] == {"name": "flowbp-tokens", "key": "redis-password"}
    password = secret_data(default_docs)["redis-password"]
    assert password.isalnum() and len(password) == 32
    assert redis["metadata"]["annotations"]["flowbp.io/redis-password-checksum"] == \
        hashlib.sha256(password.encode()).hexdigest()


def test_a_token_change_restarts_the_pods_that_use_it(default_docs):
    ray = secret_data(default_docs)["auth_token"]
    for _, template in pod_templates(one(default_docs, "RayCluster")):
        assert template["metadata"]["annotations"]["flowbp.io/ray-token-checksum"] == \
            hashlib.sha256(ray.encode()).hexdigest()
    tokens = {"apiToken": "a" * 40, "rayToken": "r" * 40, "redisPassword": "p" * 20}
    first = render_docs({"auth": tokens})
    second = render_docs({"auth": dict(tokens, rayToken="s" * 40)})
    checksum = [one(docs, "Deployment", "-controller")["spec"]["template"]["metadata"]["annotations"][
        "flowbp.io/tokens-checksum"] for docs in (first, second)]
    assert checksum[0] != checksum[1]
    assert one(first, "RayCluster") != one(second, "RayCluster")


def test_an_upgrade_that_cannot_read_the_secret_fails_instead_of_rotating_tokens():
    with helm.Chart.load(str(CHART)) as chart:
        with pytest.raises(Exception, match="existingSecret"):
            chart.render(None, name=RELEASE, namespace=NAMESPACE, is_install=False, is_upgrade=True)
        # an existing Secret (the GitOps way) or tokens given in values render on upgrade too
        for values in ({"auth": {"existingSecret": "site-tokens"}},
                       {"auth": {"apiToken": "a" * 40, "rayToken": "r" * 40, "redisPassword": "p" * 20}}):
            assert chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=False, is_upgrade=True)


def test_finished_rayjobs_delete_themselves(default_docs):
    spec = rayjob(default_docs)["spec"]
    rules = spec["deletionStrategy"]["deletionRules"]
    assert {(r["policy"], r["condition"]["jobStatus"]) for r in rules} == {("DeleteSelf", "SUCCEEDED"),
                                                                          ("DeleteSelf", "FAILED")}
    assert {r["condition"]["ttlSeconds"] for r in rules} == {load_values("values.yaml")["rayJobTemplate"][
        "ttlSecondsAfterFinished"]}
    # KubeRay refuses a TTL without shutdown, and cluster deletion policies with a clusterSelector
    assert spec["shutdownAfterJobFinishes"] is False and "ttlSecondsAfterFinished" not in spec


def test_the_reward_service_is_opt_in_and_runs_its_model_on_the_gpu_it_reserves(default_docs, reward_docs):
    assert not by_kind(default_docs, "RayService")
    config = yaml.safe_load(one(reward_docs, "RayService")["spec"]["serveConfigV2"])
    assert config["applications"][0]["args"]["device"] == "cuda"
    values = load_values("values-gpu.yaml")
    values["rewardService"].update(enabled=True, args={"device": "cuda:1"})
    config = yaml.safe_load(one(render_docs(values), "RayService")["spec"]["serveConfigV2"])
    assert config["applications"][0]["args"]["device"] == "cuda:1"


def test_ray_object_names_stay_within_kuberays_limits_for_the_longest_release():
    from deploy_helpers import validate_custom

    release = "a" * 53  # Helm's longest release name
    docs = render_docs(FULL, release=release)
    for doc in by_kind(docs, "RayCluster") + by_kind(docs, "RayService"):
        validate_custom(doc)
    text = one(docs, "ConfigMap", "-rayjob-template")["data"]["rayjob.yaml"]
    job = yaml.safe_load(text.replace("${job_id}", "job-0123456789ab").replace("${config}", "c.yaml")
                         .replace("${overrides}", ""))
    validate_custom(job)
