"""The plain manifests in k8s/manifests/, the dashboard JSON and the chart's copies equal a fresh render."""

from __future__ import annotations

import pytest
import yaml
from deploy_helpers import is_custom, validate_core, validate_custom

pytest.importorskip("helm_python")

from k8s import render  # noqa: E402


@pytest.fixture(scope="module")
def expected():
    return render.expected_files()


def test_committed_files_equal_a_fresh_render(expected):
    assert render.stale_files(expected) == [], "run `python -m k8s.render` (make manifests) and commit"


def test_the_sync_check_can_fail(expected):
    target = render.MANIFESTS_DIR / "raycluster.yaml"
    changed = dict(expected)
    changed[target] = expected[target].replace("maxReplicas: 2", "maxReplicas: 3")
    assert changed[target] != expected[target]
    assert render.stale_files(changed) == ["k8s/manifests/raycluster.yaml: differs from a fresh render"]
    extra = dict(expected)
    del extra[render.GRAFANA_DIR / "system.json"]
    assert render.stale_files(extra) == ["deploy/grafana/system.json: not produced by the render any more"]


def test_plain_manifests_are_valid_and_need_the_secret_made_by_hand(expected):
    docs = []
    for path, text in expected.items():
        if path.parent == render.MANIFESTS_DIR:
            docs.extend(d for d in yaml.safe_load_all(text) if d)
    kinds = {d["kind"] for d in docs}
    assert "Namespace" in kinds and "RayCluster" in kinds and "Secret" not in kinds
    for doc in docs:
        (validate_custom if is_custom(doc) else validate_core)(doc)
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == render.NAMESPACE
    refs = [e["valueFrom"]["secretKeyRef"]["name"] for d in docs if d["kind"] == "Deployment"
            for e in d["spec"]["template"]["spec"]["containers"][0]["env"] if "secretKeyRef" in e.get("valueFrom", {})]
    assert refs and set(refs) == {"flowbp-tokens"}


def test_check_mode_reports_current_files(capsys):
    assert render.main(["--check"]) == 0
    assert "current" in capsys.readouterr().out
