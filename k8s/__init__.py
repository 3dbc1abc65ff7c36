"""FlowBP's Kubernetes deployment: the Helm chart, its plain-manifest render, and the dashboards it ships.

`python -m k8s.render` regenerates everything derived (dashboard JSON, the chart's copies of dashboards and alert
rules, plain manifests); tests/deploy checks that the committed files equal a fresh render.
"""
