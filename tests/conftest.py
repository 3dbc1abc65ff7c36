"""Session-wide fixtures: offline hubs, one local Ray head per pytest session, real Redis servers.

Everything listens on 127.0.0.1. The Ray head is started lazily (only sessions that ask for it pay its ~8 s)
and stopped by pid at the end of the session, so concurrent test runs never kill each other's clusters.
"""

from __future__ import annotations

import os

# Before anything imports transformers/diffusers/ray: no hub access in tests, Ray on loopback only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
for _k, _v in {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
               "RAY_USAGE_STATS_ENABLED": "0"}.items():
    os.environ.setdefault(_k, _v)
# Every Ray the tests start (heads, jobs, local ray.init) inherits these, so that it holds on a loaded machine:
# Ray starts its workers at nice 15, which beside one busy process at nice 0 get about 1/30 of a core (CFS weights
# 36 vs 1024); and its own deadlines (dashboard start 60 s, its modules 30 s, a Ray Train worker group 60 s, a
# Serve proxy ready 5 s, a proxy or replica health check 10 s / 30 s) run out when a 2-core machine is shared.
for _k, _v in {"RAY_worker_niceness": "0", "RAY_DASHBOARD_STARTUP_TIMEOUT_S": "600",
               "RAY_DASHBOARD_SUBPROCESS_MODULE_WAIT_READY_TIMEOUT": "300",
               "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "600", "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "120",
               "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "120",
               "RAY_SERVE_DEPLOYMENT_ACTOR_HEALTH_CHECK_TIMEOUT_S": "120"}.items():
    os.environ.setdefault(_k, _v)

import pytest  # noqa: E402

from services.localproc import RayHead, RedisServer  # noqa: E402


@pytest.fixture(scope="session")
def ray_head():
    """A local `ray start --head` (job server included) shared by the whole session."""
    # Exports every 2 s (Ray's default is 10 s): a job's end waits for its last values to be exported.
    head = RayHead(num_cpus=4, object_store_mb=512, env={"RAY_metrics_report_interval_ms": "2000"}).start(
        timeout=600)  # minutes when the machine is loaded
    try:
        yield head
    finally:
        head.stop()


@pytest.fixture(scope="session")
def ray_client(ray_head):
    """This pytest process connected as a driver to the session's Ray head."""
    import ray

    if not ray.is_initialized():
        ray.init(address=ray_head.gcs_address, log_to_driver=False)
    yield ray
    # Disconnect before the head stops (this fixture tears down first), so the driver does not log errors about a
    # cluster that vanished under it after pytest's summary line.
    ray.shutdown()


@pytest.fixture
def redis_server(tmp_path):
    """A real redis-server with an append-only file in tmp_path; .stop()/.start() keep the data."""
    server = RedisServer(data_dir=tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def constructed_models(monkeypatch) -> list[str]:
    """The class names of the transformers models constructed while the test runs (the real constructors run)."""
    import transformers

    built: list[str] = []
    init = transformers.PreTrainedModel.__init__

    def counting_init(self, *args, **kwargs):
        built.append(type(self).__name__)
        init(self, *args, **kwargs)

    monkeypatch.setattr(transformers.PreTrainedModel, "__init__", counting_init)
    return built
