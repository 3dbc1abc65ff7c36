"""Prometheus metric names exported by the controller (see docs/interfaces.md, "Controller metric names").

Plain strings in one place, because the Grafana dashboards and the alert rules in deploy/ read them: renaming
one here without them breaks a panel silently. Exported as is (prometheus-client, no prefix added).
"""

from __future__ import annotations

# counter [route, method, code]: every HTTP request, by route template (never the raw path: ids would explode it)
REQUESTS_TOTAL = "flowbp_controller_requests_total"
# histogram [route, method]: request latency in seconds
REQUEST_SECONDS = "flowbp_controller_request_seconds"
# gauge [state]: jobs currently in each state (read from Redis at scrape time)
JOBS = "flowbp_controller_jobs"
# counter [reason]: submissions to Ray that failed (transient ones that were retried count too)
SUBMISSION_FAILURES_TOTAL = "flowbp_controller_submission_failures_total"
# gauge: 1 when the last Redis check succeeded, else 0
REDIS_UP = "flowbp_controller_redis_up"
# gauge: 1 when the last Ray job-server check succeeded, else 0
RAY_UP = "flowbp_controller_ray_up"

ALL = (REQUESTS_TOTAL, REQUEST_SECONDS, JOBS, SUBMISSION_FAILURES_TOTAL, REDIS_UP, RAY_UP)
