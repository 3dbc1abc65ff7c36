"""The local server helpers: Redis keeps data across a restart (AOF); ports are loopback and free."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from services.localproc import LOOPBACK, free_port, wait_for_port

redis = pytest.importorskip("redis")


def test_free_port_is_bindable_on_loopback():
    port = free_port()
    with socket.socket() as s:
        s.bind((LOOPBACK, port))


def test_wait_for_port_times_out_on_a_closed_port():
    with pytest.raises(TimeoutError, match="nothing listened"):
        wait_for_port(free_port(), timeout=0.3)


@pytest.mark.integration
def test_redis_restart_keeps_records(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    client.set("flowbp:test", "kept")
    client.close()
    redis_server.stop()
    assert not redis_server.running
    redis_server.start()
    assert redis.Redis.from_url(redis_server.url).get("flowbp:test") == b"kept"


@pytest.mark.integration
def test_init_local_ray_starts_its_own_even_when_another_is_named():
    """RAY_ADDRESS (or a `ray start` cluster) must not capture the demo's local Ray: plain ray.init() would try to
    join it and refuse num_cpus."""
    nowhere = f"{LOOPBACK}:{free_port()}"
    code = ("import ray; from services.localproc import init_local_ray; "
            "init_local_ray(num_cpus=1, object_store_mb=80, log_to_driver=False); "
            "print('GCS', ray.get_runtime_context().gcs_address); ray.shutdown()")
    env = {**os.environ, "RAY_ADDRESS": nowhere}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                         cwd=str(Path(__file__).resolve().parents[2]))
    assert out.returncode == 0, out.stderr[-2000:]
    gcs = [ln for ln in out.stdout.splitlines() if ln.startswith("GCS ")]
    assert gcs and gcs[0].split()[1].startswith(LOOPBACK) and gcs[0].split()[1] != nowhere
