"""The local server helpers: Redis keeps data across a restart (AOF); ports are loopback and free."""

import socket

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
