"""The reconciler against a real Redis when Ray is unreachable or dispatch is paused (no Ray needed)."""

from __future__ import annotations

import time

import pytest

from ctl_helpers import settings_for
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
