"""KubeRay's published CRD schemas as offline JSON Schemas for the chart's tests, and the validator built on them.

    python -m k8s.kuberay_crds --git-dir <kuberay clone>/.git --tag v1.6.0   # rewrite k8s/schemas/kuberay-<tag>/

Each file keeps the `spec` part of one CRD's openAPIV3Schema (served version ray.io/v1), without descriptions
(the source has them) and without `status`. `validator()` reads it the way the API server's strict field
validation does (`kubectl apply` default): a field the schema does not name is an error, unless the schema says
x-kubernetes-preserve-unknown-fields; an int-or-string field takes either.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from functools import cache
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SCHEMAS = REPO / "k8s" / "schemas"
# The oldest KubeRay the chart supports (k8s/README.md says why); its schemas are the ones the tests use.
MIN_KUBERAY = "v1.6.0"
CRDS = {"RayCluster": "rayclusters", "RayJob": "rayjobs", "RayService": "rayservices"}
CRD_PATH = "ray-operator/config/crd/bases/ray.io_{plural}.yaml"


def _strip(node):
    """Drop prose; keep every constraint."""
    if isinstance(node, dict):
        return {k: _strip(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [_strip(v) for v in node]
    return node


def extract(crd: dict) -> dict:
    """The ray.io/v1 openAPIV3Schema of a CRD, with only metadata and spec."""
    [version] = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = version["schema"]["openAPIV3Schema"]
    props = schema["properties"]
    return _strip({"type": "object", "required": ["spec"],
                   "properties": {k: props[k] for k in ("apiVersion", "kind", "metadata", "spec")}})


def write(git_dir: Path, tag: str) -> list[Path]:
    out_dir = SCHEMAS / f"kuberay-{tag}"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for plural in CRDS.values():
        text = subprocess.run(["git", f"--git-dir={git_dir}", "show", f"{tag}:{CRD_PATH.format(plural=plural)}"],
                              capture_output=True, text=True, check=True).stdout
        path = out_dir / f"{plural}.json"
        path.write_text(json.dumps(extract(yaml.safe_load(text)), separators=(",", ":"), sort_keys=True) + "\n")
        written.append(path)
    return written


def _strict(node):
    """Kubernetes' reading of a structural schema, in JSON Schema terms."""
    if isinstance(node, list):
        return [_strict(v) for v in node]
    if not isinstance(node, dict):
        return node
    node = {k: _strict(v) for k, v in node.items()}
    if node.get("x-kubernetes-int-or-string"):
        node.pop("type", None)
        node.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if ("properties" in node and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        node["additionalProperties"] = False
    return node


def schema(kind: str, tag: str = MIN_KUBERAY) -> dict:
    return _strict(json.loads((SCHEMAS / f"kuberay-{tag}" / f"{CRDS[kind]}.json").read_text()))


@cache
def validator(kind: str, tag: str = MIN_KUBERAY):
    import jsonschema

    return jsonschema.Draft7Validator(schema(kind, tag))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m k8s.kuberay_crds", description=__doc__.splitlines()[0])
    parser.add_argument("--git-dir", type=Path, required=True, help="a clone of github.com/ray-project/kuberay")
    parser.add_argument("--tag", default=MIN_KUBERAY)
    args = parser.parse_args(argv)
    for path in write(args.git_dir, args.tag):
        print(f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
