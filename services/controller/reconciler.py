"""The reconciler: moves job records forward by asking Ray, and hands pending jobs to Ray.

One pass (`run_once`), every `reconcile_interval_s` or when woken by a new submit or a cancel:
  1. take (or renew) the `reconciler` lease in Redis, so with several controller replicas exactly one acts;
  2. stop the Ray jobs of cancelled jobs that could not be stopped at cancel time (Ray was unreachable);
  3. for each submitted/running job ask Ray for its status: RUNNING -> running, SUCCEEDED -> succeeded,
     STOPPED -> cancelled, FAILED or unknown to Ray -> resubmitted to resume from its newest complete checkpoint
     while resubmissions remain, else failed; and record the run's newest complete checkpoint;
  4. submit pending jobs, oldest first, while fewer than `max_active_jobs` are on Ray.

Everything the reconciler knows lives in Redis, so a restarted controller (or another replica, once the lease
expires) continues exactly where the last one stopped. Ray calls happen outside Redis transactions; each write
afterwards re-checks that the record is still in the state the decision was made from (a cancel may have come
in meanwhile) and, if not, undoes the Ray side (stops the job it just submitted).
"""

from __future__ import annotations

import logging
import os
import shlex
import socket
import threading
import time
import uuid
from pathlib import Path

import yaml

from .metrics import ControllerMetrics
from .models import JobRecord, JobState
from .runs import run_folder
from .settings import ControllerSettings
from .store import JobNotFound, JobStore, StoreUnavailable
from .submission import (JobBackend, PermanentError, RayJobInfo, SubmitRequest, TransientError, UnknownRayJob,
                         with_retries)

log = logging.getLogger("flowbp.controller.reconciler")
LEASE = "reconciler"


def submission_id(job_id: str, attempt: int) -> str:
    return f"flowbp-{job_id}-{attempt}"


class Reconciler:
    def __init__(self, settings: ControllerSettings, store: JobStore, backend: JobBackend,
                 metrics: ControllerMetrics):
        self.settings = settings
        self.store = store
        self.backend = backend
        self.metrics = metrics
        self.owner = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.lease_ttl_s = max(10.0, 3 * settings.reconcile_interval_s)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_outage_log = 0.0

    # ---- thread ----
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="flowbp-reconciler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 15.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        try:
            self.store.release_lease(LEASE, self.owner)  # the next controller need not wait for the TTL
        except StoreUnavailable:
            pass

    def wake(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except StoreUnavailable as e:
                self.metrics.redis_up.set(0)
                if time.monotonic() - self._last_outage_log > 30:  # one line per outage, not one per tick
                    log.warning("reconciler paused: %s", e)
                    self._last_outage_log = time.monotonic()
            except Exception:
                log.exception("reconciler pass failed; retrying next tick")
            self._wake.wait(self.settings.reconcile_interval_s)
            self._wake.clear()

    # ---- one pass ----
    def run_once(self) -> bool:
        """One pass; False if another controller holds the lease (then nothing was done)."""
        if not self.store.acquire_lease(LEASE, self.owner, self.lease_ttl_s):
            return False
        self.metrics.redis_up.set(1)
        self._check_ray()
        for job_id in self.store.ids_stop_pending():
            self._retry_stop(job_id)
        for state in (JobState.submitted, JobState.running):
            for job_id in self.store.ids_in_state(state):
                if self._stop.is_set():
                    return True
                self._reconcile_active(job_id)
        self._dispatch_pending()
        return True

    def _check_ray(self) -> bool:
        try:
            self.backend.ping()
        except (TransientError, PermanentError):
            self.metrics.ray_up.set(0)
            return False
        self.metrics.ray_up.set(1)
        return True

    # ---- pending -> submitted ----
    def _dispatch_pending(self) -> None:
        counts = self.store.count_by_state()
        slots = self.settings.max_active_jobs - counts[JobState.submitted] - counts[JobState.running]
        if slots <= 0:
            return
        now = time.time()
        for job_id in self.store.ids_in_state(JobState.pending):
            if slots <= 0 or self._stop.is_set():
                break
            try:
                rec = self.store.get(job_id)
            except JobNotFound:
                continue
            if rec.state is not JobState.pending or rec.next_dispatch_at > now:
                continue
            if self._submit(rec, reason=f"submitted to Ray as {submission_id(rec.id, rec.attempts + 1)}"):
                slots -= 1

    def write_spec(self, rec: JobRecord) -> Path:
        """The job's resolved run config, where the Ray job reads it (shared storage in a cluster)."""
        d = self.settings.spec_dir.resolve()
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"{rec.id}.yaml"
        tmp = path.with_suffix(f".tmp-{uuid.uuid4().hex[:6]}")
        tmp.write_text(yaml.safe_dump(rec.config, sort_keys=False))
        tmp.replace(path)  # atomic: a resubmitted job never reads a half-written file
        return path

    def _request(self, rec: JobRecord, attempt: int) -> SubmitRequest:
        spec = self.write_spec(rec)
        entry = f"{self.settings.entrypoint} --config {shlex.quote(str(spec))}"
        env = dict(self.settings.runtime_env)
        env_vars = {**env.get("env_vars", {}), "FLOWBP_JOB_ID": rec.id, "FLOWBP_RUN_ID": rec.run_id,
                    "FLOWBP_ATTEMPT": str(attempt)}
        env["env_vars"] = env_vars
        return SubmitRequest(submission_id=submission_id(rec.id, attempt), entrypoint=entry, runtime_env=env,
                             metadata={"flowbp_job_id": rec.id, "flowbp_run_id": rec.run_id, "name": rec.name})

    def _submit(self, rec: JobRecord, reason: str) -> bool:
        """Submit attempt rec.attempts + 1; on success move rec to `submitted` with `reason`."""
        attempt = rec.attempts + 1
        seen_state, seen_attempts = rec.state, rec.attempts

        def unchanged(r: JobRecord) -> bool:
            return r.state is seen_state and r.attempts == seen_attempts

        def count_failure(e: TransientError) -> None:
            self.metrics.submission_failures.labels(reason="ray_unreachable").inc()

        try:
            req = self._request(rec, attempt)
        except OSError as e:  # spec_dir not writable or full: say so on the job instead of retrying silently
            self._note_dispatch_error(rec.id, unchanged, f"cannot write the job spec to {self.settings.spec_dir}: {e}")
            return False
        try:
            with_retries(lambda: self.backend.submit(req), attempts=self.settings.submit_retries,
                         backoff_s=self.settings.retry_backoff_s, backoff_max_s=self.settings.retry_backoff_max_s,
                         what=f"submit {req.submission_id}", on_failure=count_failure)
        except TransientError as e:
            self._note_dispatch_error(rec.id, unchanged, str(e))
            return False
        except PermanentError as e:
            self.metrics.submission_failures.labels(reason="ray_refused").inc()
            why = f"Ray refused the job: {e}"  # bound here: `e` is unbound once the except block ends
            self._mutate(rec.id, lambda r: unchanged(r) and r.transition(JobState.failed, why))
            return False

        raced = []

        def record(r: JobRecord) -> bool:
            if not unchanged(r):
                raced.append(r.state)
                return False
            r.attempts = attempt
            r.ray_submission_id = req.submission_id
            r.ray_status, r.ray_message = "PENDING", None
            r.first_dispatch_error_at, r.next_dispatch_at = None, 0.0
            r.transition(JobState.submitted, reason)
            return True

        self._mutate(rec.id, record)
        if raced:  # cancelled (or otherwise moved) while we were submitting: take the Ray job back
            log.info("job %s became %s during submission; stopping %s", rec.id, raced[0], req.submission_id)
            self._try_stop(req.submission_id)
            return False
        log.info("job %s: %s", rec.id, reason)
        return True

    def _note_dispatch_error(self, job_id: str, unchanged, err: str) -> None:
        now = time.time()
        s = self.settings

        def change(r: JobRecord) -> bool:
            if not unchanged(r):
                return False
            first = r.first_dispatch_error_at or now
            waited = now - first
            if r.state is JobState.pending and waited > s.pending_timeout_s:
                r.transition(JobState.failed, f"Ray could not take the job for {waited:.0f}s: {err}")
                return True
            delay = min(s.retry_backoff_max_s, max(s.retry_backoff_s, waited / 2))
            r.first_dispatch_error_at = first
            r.next_dispatch_at = now + delay
            r.reason = f"waiting for Ray ({err}); next try in {delay:.0f}s"
            r.updated_at = now
            return True

        self._mutate(job_id, change)

    # ---- submitted/running -> ... ----
    def _reconcile_active(self, job_id: str) -> None:
        try:
            rec = self.store.get(job_id)
        except JobNotFound:
            return
        if rec.state not in (JobState.submitted, JobState.running) or rec.ray_submission_id is None:
            return
        sub = rec.ray_submission_id
        rec = self._update_checkpoint(rec)
        try:
            info = self.backend.info(sub)
        except UnknownRayJob:
            self._on_died(rec, f"Ray has no record of {sub} (was the Ray cluster replaced?)")
            return
        except (TransientError, PermanentError) as e:
            msg = f"Ray unreachable, status unknown (last: {rec.ray_status or 'none'}): {e}"
            self._mutate(job_id, lambda r: r.version == rec.version and _set_reason(r, msg))
            return
        if info.status == "FAILED":
            self._on_died(rec, f"Ray job {sub} failed: {info.message or info.error_type or 'no message'}")
            return
        target = {"RUNNING": JobState.running, "SUCCEEDED": JobState.succeeded,
                  "STOPPED": JobState.cancelled}.get(info.status)

        def change(r: JobRecord) -> bool:
            if r.ray_submission_id != sub or r.state.terminal:
                return False
            changed = (r.ray_status, r.ray_message) != (info.status, info.message)
            r.ray_status, r.ray_message = info.status, info.message
            if target is not None and target is not r.state:
                r.transition(target, _reason_for(info, sub, r))
                return True
            if r.reason.startswith("Ray unreachable"):  # Ray is back: drop the stale outage note
                r.reason = f"Ray job {sub} is {info.status.lower()}"
                return True
            return changed

        after = self._mutate(job_id, change)
        if after is not None and after.state.terminal:
            self._update_checkpoint(after)
            log.info("job %s: %s", job_id, after.reason)

    def _on_died(self, rec: JobRecord, why: str) -> None:
        used = rec.attempts - 1
        if used < rec.max_resubmits and rec.next_dispatch_at <= time.time():
            ckpt = rec.latest_checkpoint
            frm = f"step_{ckpt.step}" if ckpt else "the start (no complete checkpoint yet)"
            new = submission_id(rec.id, rec.attempts + 1)
            self._submit(rec, reason=f"{why}; resubmitted as {new} (resubmission {used + 1} of "
                                     f"{rec.max_resubmits}) to resume from {frm}")
            return
        if used < rec.max_resubmits:
            return  # backing off after a failed resubmission; try again later
        self._mutate(rec.id, lambda r: r.version == rec.version and r.transition(
            JobState.failed, f"{why}; no resubmissions left ({rec.max_resubmits} allowed)") is None)

    def _update_checkpoint(self, rec: JobRecord) -> JobRecord:
        """Record the run's newest complete checkpoint; returns the (possibly updated) record."""
        try:
            ref = run_folder(self.settings.runs_dir, rec.run_id).latest_complete()
        except (OSError, ValueError) as e:
            log.warning("job %s: cannot read checkpoints: %s", rec.id, e)
            return rec
        if ref is None or ref == rec.latest_checkpoint:
            return rec
        self.store.set_run_checkpoint(rec.run_id, ref)

        def change(r: JobRecord) -> bool:
            if r.latest_checkpoint == ref:
                return False
            r.latest_checkpoint = ref
            return True

        return self._mutate(rec.id, change) or rec

    # ---- cancel support ----
    def _try_stop(self, sub: str) -> bool:
        try:
            self.backend.stop(sub)
            return True
        except UnknownRayJob:
            return True  # nothing to stop
        except (TransientError, PermanentError) as e:
            log.warning("could not stop Ray job %s yet: %s", sub, e)
            return False

    def _retry_stop(self, job_id: str) -> None:
        try:
            rec = self.store.get(job_id)
        except JobNotFound:
            return
        if rec.ray_submission_id is None or self._try_stop(rec.ray_submission_id):
            self._mutate(job_id, lambda r: _clear_stop(r))

    def _mutate(self, job_id: str, change) -> JobRecord | None:
        try:
            return self.store.mutate(job_id, change)
        except JobNotFound:
            return None


def _set_reason(r: JobRecord, msg: str) -> bool:
    if r.reason == msg:
        return False
    r.reason, r.updated_at = msg, time.time()
    return True


def _clear_stop(r: JobRecord) -> bool:
    if not r.stop_pending:
        return False
    r.stop_pending = False
    return True


def _reason_for(info: RayJobInfo, sub: str, r: JobRecord) -> str:
    if info.status == "RUNNING":
        return f"Ray job {sub} is running"
    if info.status == "SUCCEEDED":
        return f"Ray job {sub} succeeded"
    if r.cancel_requested:
        return f"cancelled; Ray job {sub} stopped"
    return f"Ray job {sub} was stopped outside the controller (e.g. `ray job stop`)"
