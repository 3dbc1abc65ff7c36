"""The Ray system metrics FlowBP's dashboards and alerts read (exported by Ray itself, not by our code).

This allow-list is the only exception to "every metric in a PromQL expression is one our code exports"
(tests/deploy/test_metrics_coverage.py). Each name is in Ray's system-metrics reference
(docs.ray.io, ray-observability/reference/system-metrics) and in the Grafana panels Ray 2.60 itself ships
(ray/dashboard/modules/metrics/dashboards/default_dashboard_panels.py), which a test reads to catch a rename.
"""

from __future__ import annotations

# Physical GPU utilisation per GPU, in percent (label GpuIndex, GpuDeviceName).
NODE_GPUS_UTILIZATION = "ray_node_gpus_utilization"
# GPU memory used / still free per GPU, in MB.
NODE_GRAM_USED = "ray_node_gram_used"
NODE_GRAM_AVAILABLE = "ray_node_gram_available"
# Object store bytes by Location (MMAP_SHM, MMAP_DISK, SPILLED, WORKER_HEAP).
OBJECT_STORE_MEMORY = "ray_object_store_memory"
# Logical resources by Name (CPU, GPU, object_store_memory, custom) and State (USED, AVAILABLE).
RESOURCES = "ray_resources"

ALL: tuple[str, ...] = (
    NODE_GPUS_UTILIZATION,
    NODE_GRAM_USED,
    NODE_GRAM_AVAILABLE,
    OBJECT_STORE_MEMORY,
    RESOURCES,
)
