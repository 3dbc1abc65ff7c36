"""The controller's Prometheus metrics (names from metric_names.py), in a registry of their own per app.

A private CollectorRegistry (not prometheus-client's global one) lets several apps live in one process, as
the tests and the load benchmark do. Jobs by state are read from Redis at scrape time by a custom collector, so
the gauge is right even for jobs another controller replica changed; when Redis is down the scrape still works
and simply omits that gauge (redis_up says why).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric

from . import metric_names as names
from .models import JobState
from .store import JobStore, StoreUnavailable

log = logging.getLogger("flowbp.controller.metrics")

# Controller calls are Redis round trips: most land in the low milliseconds; the tail buckets catch outages.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _JobsByState:
    def __init__(self, store: JobStore, metrics: "ControllerMetrics"):
        self.store = store
        self.metrics = metrics

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(names.JOBS, "jobs in each state", labels=["state"])

    def collect(self) -> Iterator[Metric]:
        g = GaugeMetricFamily(names.JOBS, "jobs in each state", labels=["state"])
        try:
            counts = self.store.count_by_state()
        except StoreUnavailable:
            self.metrics.redis_up.set(0)
            return
        self.metrics.redis_up.set(1)
        for state in JobState:
            g.add_metric([state.value], counts.get(state, 0))
        yield g


class ControllerMetrics:
    def __init__(self, store: JobStore | None = None):
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(names.REQUESTS_TOTAL, "HTTP requests by route template, method and status code",
                                ["route", "method", "code"], registry=self.registry)
        self.latency = Histogram(names.REQUEST_SECONDS, "HTTP request latency in seconds", ["route", "method"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.submission_failures = Counter(names.SUBMISSION_FAILURES_TOTAL,
                                           "failed submissions to Ray (each failed try)", ["reason"],
                                           registry=self.registry)
        self.redis_up = Gauge(names.REDIS_UP, "1 if the last Redis check succeeded", registry=self.registry)
        self.ray_up = Gauge(names.RAY_UP, "1 if the last Ray job-server check succeeded", registry=self.registry)
        if store is not None:
            self.registry.register(_JobsByState(store, self))

    def observe_request(self, route: str, method: str, code: int, seconds: float) -> None:
        self.requests.labels(route=route, method=method, code=str(code)).inc()
        self.latency.labels(route=route, method=method).observe(seconds)
