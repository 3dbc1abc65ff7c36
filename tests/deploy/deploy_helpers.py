"""Helpers of the deployment tests: the chart rendered offline (Helm SDK, no cluster), objects picked by kind."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "k8s" / "helm" / "flowbp"
RELEASE, NAMESPACE = "flowbp", "flowbp"
DASHBOARDS = REPO / "deploy" / "grafana"
ALERT_RULES = REPO / "deploy" / "prometheus" / "flowbp-alerts.yaml"


def panel_targets() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target of every dashboard; where is "<file> / <panel title> / <refId>"."""
    out = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel.get("targets", []):
                out.append((f"{path.name} / {panel['title']} / {target['refId']}", target["expr"]))
    return out


def template_queries() -> list[tuple[str, str, str]]:
    """(dashboard file, variable name, Grafana query) for every query variable, e.g. label_values(m, run_id)."""
    return [(path.name, var["name"], var["query"]["query"])
            for path in sorted(DASHBOARDS.glob("*.json"))
            for var in json.loads(path.read_text())["templating"]["list"] if var["type"] == "query"]


def alert_exprs() -> list[tuple[str, str]]:
    """(alert name, PromQL) for every rule of deploy/prometheus/flowbp-alerts.yaml."""
    rules = yaml.safe_load(ALERT_RULES.read_text())
    return [(r.get("alert") or r["record"], r["expr"]) for g in rules["groups"] for r in g["rules"]]


def load_values(name: str) -> dict:
    return yaml.safe_load((CHART / name).read_text())


def merge_values(base: dict, top: dict) -> dict:
    """`top` over `base` as `helm -f base -f top` merges them: maps key by key, anything else replaced."""
    out = dict(base)
    for key, value in top.items():
        both_maps = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merge_values(out[key], value) if both_maps else value
    return out


def one_gpu_values() -> dict:
    """The documented one-GPU layout: values-gpu.yaml with values-one-gpu.yaml on top."""
    return merge_values(load_values("values-gpu.yaml"), load_values("values-one-gpu.yaml"))


def render_docs(values: dict | None, *, release: str = RELEASE, namespace: str = NAMESPACE) -> list[dict]:
    """Every object the chart renders with `values` (defaults merged by Helm), in template order."""
    from k8s.render import render_chart

    docs = []
    for text in render_chart(CHART, values, release=release, namespace=namespace).values():
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str, name_suffix: str = "") -> dict:
    found = [d for d in by_kind(docs, kind) if d["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, f"expected one {kind} named *{name_suffix}, found {[d['metadata']['name'] for d in found]}"
    return found[0]


CUSTOM_GROUPS = ("ray.io/", "monitoring.coreos.com/")
# The chart's floor (Chart.yaml kubeVersion) and the newest schema kubernetes-validate ships.
KUBE_VERSIONS = ("1.27.0", None)


def is_custom(doc: dict) -> bool:
    return doc["apiVersion"].startswith(CUSTOM_GROUPS)


def validate_core(doc: dict) -> None:
    """kubernetes-validate --strict (unknown fields rejected) at every Kubernetes version we support."""
    import kubernetes_validate
    from kubernetes_validate.utils import latest_version

    for version in KUBE_VERSIONS:
        kubernetes_validate.validate(doc, version or latest_version(), strict=True)


def pod_templates(doc: dict) -> list[tuple[str, dict]]:
    """(where, template) for every pod template inside a KubeRay object."""
    specs = []
    if doc["kind"] == "RayCluster":
        specs.append(("spec", doc["spec"]))
    elif doc["kind"] == "RayService":
        specs.append(("spec.rayClusterConfig", doc["spec"]["rayClusterConfig"]))
    out = []
    for where, spec in specs:
        out.append((f"{where}.headGroupSpec.template", spec["headGroupSpec"]["template"]))
        for group in spec.get("workerGroupSpecs", []):
            out.append((f"{where}.workerGroupSpecs[{group['groupName']}].template", group["template"]))
    return out


# KubeRay 1.6.0's MaxRayClusterNameLength (53) and the 6 characters fewer it allows the objects that derive one
RAY_NAME_LIMITS = {"RayCluster": 53, "RayService": 47, "RayJob": 47}


def validate_custom(doc: dict) -> None:
    """A KubeRay or Prometheus Operator object: KubeRay's own CRD schema of the oldest KubeRay we support (unknown
    fields rejected, as the API server's strict validation does) or our schema of the Prometheus Operator fields,
    Kubernetes' own PodTemplate schema for the pods inside, and Ray's own validators for the Serve config and the
    runtime env."""
    import json
    import re

    import jsonschema

    from k8s import kuberay_crds

    meta = doc.get("metadata", {})
    # a generateName prefix ends in "-" and leaves 5 characters for the API server's suffix
    name = meta["generateName"] + "x" * 5 if "generateName" in meta else meta.get("name", "")
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) or len(name) > 63:
        raise jsonschema.ValidationError(f"metadata.name {name!r} is not a lower-case DNS label")
    if doc["apiVersion"] == "ray.io/v1":
        kuberay_crds.validator(doc["kind"]).validate(doc)
        # the operator's own name rules (ray-operator/controllers/ray/utils/validation.go): DNS-1035, and short
        # enough for the names it derives
        limit = RAY_NAME_LIMITS[doc["kind"]]
        if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) or len(name) > limit:
            raise jsonschema.ValidationError(f"{doc['kind']} name {name!r}: KubeRay wants a DNS-1035 label of at most "
                                             f"{limit} characters")
    else:
        schema = json.loads((REPO / "k8s" / "schemas" / "prometheus-operator.json").read_text())
        jsonschema.Draft202012Validator(schema).validate(doc)
    for where, template in pod_templates(doc):
        wrapper = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"}, "template": template}
        try:
            validate_core(wrapper)
        except Exception as e:  # name the place inside the custom resource
            raise AssertionError(f"{doc['kind']}/{doc['metadata']['name']} {where}: {e}") from e
    if doc["kind"] == "RayService":
        from ray.serve.schema import ServeDeploySchema

        ServeDeploySchema.model_validate(yaml.safe_load(doc["spec"]["serveConfigV2"]))
    if doc["kind"] == "RayJob" and doc["spec"].get("runtimeEnvYAML"):
        from ray.runtime_env import RuntimeEnv

        RuntimeEnv(**yaml.safe_load(doc["spec"]["runtimeEnvYAML"]))


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}
