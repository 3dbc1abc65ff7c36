"""values.schema.json: a wrong value fails at install time, and the message names the field."""

from __future__ import annotations

import pytest
from deploy_helpers import CHART, RELEASE, NAMESPACE, load_values

helm = pytest.importorskip("helm_python")


@pytest.fixture(scope="module")
def chart():
    with helm.Chart.load(str(CHART)) as c:
        yield c


@pytest.mark.parametrize("values_file", ["values.yaml", "values-gpu.yaml"])
def test_shipped_values_pass(chart, values_file):
    chart.validate_schema(None if values_file == "values.yaml" else load_values(values_file))


BAD = [
    # (values, the field path the message must name, what must be said about it)
    ({"controller": {"replicas": "two"}}, "/controller/replicas", "want integer"),
    ({"ray": {"workerGroups": {"learner": {"gpus": "1"}}}}, "/ray/workerGroups/learner/gpus", "want integer"),
    ({"ray": {"workerGroups": {"rollout": {"gpus": -1}}}}, "/ray/workerGroups/rollout/gpus", "minimum"),
    ({"ray": {"workerGroups": {"reward": {"enabled": "yes"}}}}, "/ray/workerGroups/reward/enabled", "want boolean"),
    ({"ray": {"head": {"memory": "lots"}}}, "/ray/head/memory", "does not match pattern"),
    ({"image": {"tag": "latest"}}, "/image/tag", "not"),
    ({"auth": {"rayAuthMode": "off"}}, "/auth/rayAuthMode", "one of 'token', 'disabled'"),
    ({"auth": {"apiToken": "short"}}, "/auth/apiToken", "pattern"),
    ({"redis": {"appendFsync": "sometimes"}}, "/redis/appendFsync", "must be one of"),
    ({"monitoring": {"podMonitor": {"interval": "30 seconds"}}}, "/monitoring/podMonitor/interval", "pattern"),
    ({"controlller": {"replicas": 2}}, "controlller", "additional properties"),
    ({"ray": {"workerGroups": {"rolout": {}}}}, "rolout", "additional properties"),
    ({"ray": {"workerGroups": {"rollout": {"nodeSelector": {"nvidia.com/gpu.present": "true"}}}}},
     "/ray/workerGroups/rollout/nodeSelector/nvidia.com~1gpu.present", "select a label of the node group"),
    ({"ray": {"gpuNodeSelector": {"feature.node.kubernetes.io/pci-10de.present": "true"}}},
     "/ray/gpuNodeSelector/feature.node.kubernetes.io~1pci-10de.present", "not allowed"),
    ({"ray": {"upgradeStrategy": "Rolling"}}, "/ray/upgradeStrategy", "one of 'Recreate', 'None'"),
    ({"ray": {"gcsFaultTolerance": {"redisAddress": "redis://x:6379"}}}, "/ray/gcsFaultTolerance/redisAddress",
     "pattern"),
    ({"ray": {"disruption": {"doNotEvict": "yes"}}}, "/ray/disruption/doNotEvict", "want boolean"),
    ({"ray": {"jobRuntime": {"roleResources": "yes"}}}, "/ray/jobRuntime/roleResources", "want boolean"),
    ({"ray": {"jobRuntime": {"helloTimeoutSeconds": 5}}}, "/ray/jobRuntime/helloTimeoutSeconds", "minimum"),
    ({"auth": {"redisPassword": "has/slash-and-more"}}, "/auth/redisPassword", "pattern"),
    ({"networkPolicy": {"operatorNamespace": "Kube_Ray"}}, "/networkPolicy/operatorNamespace", "pattern"),
    ({"networkPolicy": {"operatorNamespace": ""}}, "/networkPolicy/operatorNamespace", "minLength"),
    ({"rayJobTemplate": {"ttlSecondsAfterFinished": -1}}, "/rayJobTemplate/ttlSecondsAfterFinished", "minimum"),
    # Missing required values: Helm drops a key set to null, so these are what a values file without them gives.
    ({"image": {"tag": None}}, "/image", "missing property 'tag'"),
    ({"ray": {"version": None}}, "/ray", "missing property 'version'"),
    ({"redis": {"enabled": False}}, "/redis/external/existingSecret", "minLength"),
    ({"controller": {"ingress": {"enabled": True, "host": None}}}, "/controller/ingress", "missing property 'host'"),
    ({"controller": {"ingress": {"enabled": True, "tls": {"enabled": True}}}},
     "/controller/ingress/tls/secretName", "minLength"),
]


@pytest.mark.parametrize("values, field, said", BAD, ids=[b[1] for b in BAD])
def test_bad_values_fail_naming_the_field(chart, values, field, said):
    with pytest.raises(helm.HelmValuesError) as err:
        chart.validate_schema(values)
    message = str(err.value)
    assert field in message and said in message, message
    # The same check runs when the chart is installed (rendered): nothing reaches the cluster.
    with pytest.raises(helm.HelmValuesError, match=field.split("/")[-1]):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


def test_a_values_file_from_disk_is_checked_the_same_way(chart, tmp_path):
    """What `helm install -f my-values.yaml` does: parse the file, merge, validate."""
    path = tmp_path / "my-values.yaml"
    path.write_text("ray:\n  workerGroups:\n    rollout:\n      maxReplicas: many\n")
    values = helm.values_from_yaml(path.read_text())
    with pytest.raises(helm.HelmValuesError, match="/ray/workerGroups/rollout/maxReplicas"):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
