"""The reconciler against a real Redis when Ray is unreachable or dispatch is paused (no Ray needed)."""

from __future__ import annotations

import time

import pytest

from controller_helpers import settings_for
from services.controller.app import Controller
from services.controller.auth import TokenStore
from services.controller.models import JobRecord, JobState, Transition

pytestmark = pytest.mark.integration


def _controller(redis_server, tmp_path, **kw) -> Controller:
    s = settings_for(redis_server.url, tmp_path, **kw)
    return Controller(s, TokenStore("T", None, env={"T": "x" * 20}), backend=None)


def _pending(ctl: Controller, name: str = "j") -> JobRecord:
    now = time.time()
    rec = JobRecord(id=f"job-{name}", name=name, run_id=f"job-{name}", created_at=now, updated_at=now,
                    history=[Transition(state=JobState.pending, at=now, reason="accepted")],
                    config={"run_id": f"job-{name}", "train": {"steps": 1}}, max_resubmits=0)
    return ctl.store.create(rec)[0]


def test_unreachable_ray_keeps_job_pending_with_reason_then_times_out(redis_server, tmp_path):
    ctl = _controller(redis_server, tmp_path, pending_timeout_s=1.0, retry_backoff_s=0.05, submit_retries=2)
    rec = _pending(ctl)
    assert ctl.reconciler.run_once()
    r = ctl.store.get(rec.id)
    assert r.state is JobState.pending and r.reason.startswith("waiting for Ray (Ray job server unreachable at")
    assert r.next_dispatch_at > time.time() - 1 and r.first_dispatch_error_at is not None
    failures = ctl.metrics.registry.get_sample_value("flowbp_controller_submission_failures_total",
                                                     {"reason": "ray_unreachable"})
    assert failures == 2  # both tries counted
    assert ctl.metrics.registry.get_sample_value("flowbp_controller_ray_up") == 0
    assert (tmp_path / "runs" / "_jobs" / f"{rec.id}.yaml").exists()  # the spec was written for the Ray job

    time.sleep(1.1)
    ctl.reconciler.run_once()
    r = ctl.store.get(rec.id)
    assert r.state is JobState.failed and "Ray could not take the job for" in r.reason
    assert [t.state for t in r.history] == [JobState.pending, JobState.failed]


def test_paused_dispatch_leaves_jobs_pending_untouched(redis_server, tmp_path):
    ctl = _controller(redis_server, tmp_path, max_active_jobs=0)
    rec = _pending(ctl)
    ctl.reconciler.run_once()
    r = ctl.store.get(rec.id)
    assert r.state is JobState.pending and r.reason == "accepted" and r.version == 0
    assert ctl.metrics.registry.get_sample_value("flowbp_controller_submission_failures_total",
                                                 {"reason": "ray_unreachable"}) is None


def test_one_reconciler_at_a_time_across_replicas(redis_server, tmp_path):
    a = _controller(redis_server, tmp_path, max_active_jobs=0)
    b = _controller(redis_server, tmp_path, max_active_jobs=0)
    assert a.reconciler.run_once() is True
    assert b.reconciler.run_once() is False  # a holds the lease
    assert a.reconciler.run_once() is True  # renewal by the holder
    a.reconciler.stop()  # releases the lease (the thread was never started)
    assert b.reconciler.run_once() is True


def test_store_mutations_are_atomic_under_concurrency(redis_server, tmp_path):
    """Two writers updating one record concurrently: no update is lost (WATCH/MULTI retries)."""
    import threading

    ctl = _controller(redis_server, tmp_path)
    rec = _pending(ctl)

    def bump(n):
        for _ in range(n):
            ctl.store.mutate(rec.id, lambda r: r.labels.__setitem__("n", str(int(r.labels.get("n", "0")) + 1)))

    threads = [threading.Thread(target=bump, args=(50,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    r = ctl.store.get(rec.id)
    assert r.labels["n"] == "200" and r.version == 200
    assert ctl.store.count_by_state()[JobState.pending] == 1


def test_real_server_rides_out_a_redis_restart(redis_server, tmp_path):
    """A uvicorn controller with its reconciler running: 503 while Redis is down, then back by itself."""
    from controller_helpers import ControllerProcess, controller_env
    from tests.waiting import wait_for

    # Dispatch paused: each reconciler pass is then a few Redis calls, never a Ray submit waiting out back-offs.
    env = controller_env(redis_server.url, "http://127.0.0.1:9", tmp_path, FLOWBP_RECONCILE_INTERVAL_S="0.2",
                         FLOWBP_MAX_ACTIVE_JOBS="0")
    ctl = ControllerProcess(env, tmp_path / "controller.log").start()
    try:
        with ctl.client() as c:
            ids = [c.post("/v1/jobs", json={"name": f"r{i}", "config": {}}).json()["id"] for i in range(5)]
            before = [c.get(f"/v1/jobs/{i}").json() for i in ids]
            redis_server.stop()
            r = c.get(f"/v1/jobs/{ids[0]}")
            assert r.status_code == 503 and "Redis is unavailable" in r.json()["detail"]
            log = tmp_path / "controller.log"
            wait_for(lambda: "reconciler paused: Redis is unavailable" in log.read_text(), 120,
                     "the reconciler to notice the outage")  # it keeps failing passes; the process stays up
            assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 503
            redis_server.start()
            wait_for(lambda: c.get(f"/v1/jobs/{ids[0]}").status_code == 200, 120, "the API to recover")
            after = [c.get(f"/v1/jobs/{i}").json() for i in ids]
            # Same records; the reconciler may have moved on meanwhile (reason/back-off of the pending jobs).
            assert [(a["id"], a["name"], a["created_at"]) for a in after] == [
                (b["id"], b["name"], b["created_at"]) for b in before]
            wait_for(lambda: "flowbp_controller_redis_up 1.0" in c.get("/metrics").text, 120, "redis_up to return")
    finally:
        ctl.stop()


def test_unwritable_spec_dir_is_reported_on_the_job(redis_server, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")  # a file where the spec folder should be
    ctl = _controller(redis_server, tmp_path, spec_dir=blocker / "jobs")
    rec = _pending(ctl)
    ctl.reconciler.run_once()
    r = ctl.store.get(rec.id)
    assert r.state is JobState.pending and "cannot write the job spec to" in r.reason and r.next_dispatch_at > 0
