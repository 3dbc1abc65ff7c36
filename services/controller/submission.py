"""Submitting jobs to Ray and asking about them, with retries and back-off on transient failures.

`JobBackend` is the seam (a Protocol plus a registry keyed by name); `ray` (Ray's JobSubmissionClient against
the job server of a Ray head or a KubeRay cluster) is the implementation we ship.

Why submission ids are deterministic (`flowbp-<job id>-<attempt>`): a submit whose response was lost (timeout,
connection reset) may still have created the Ray job. Retrying with the same submission id then gets "already
exists" from Ray, which we take as success, so a retry can never start the same attempt twice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import requests

from .settings import ControllerSettings

log = logging.getLogger("flowbp.controller.submission")
T = TypeVar("T")

TERMINAL_RAY = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})


class TransientError(RuntimeError):
    """Worth retrying: Ray unreachable, timed out, or answered 5xx."""


class PermanentError(RuntimeError):
    """Not worth retrying: Ray refused the request (bad runtime env, bad entrypoint, ...)."""


class UnknownRayJob(PermanentError):
    """Ray has no job with this submission id (the cluster was replaced, or its job table lost)."""


@dataclass(frozen=True)
class RayJobInfo:
    status: str  # PENDING | RUNNING | STOPPED | SUCCEEDED | FAILED
    message: str | None = None
    error_type: str | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_RAY


@dataclass(frozen=True)
class SubmitRequest:
    submission_id: str
    entrypoint: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str]


class JobBackend(Protocol):
    address: str

    def ping(self) -> None: ...
    def submit(self, req: SubmitRequest) -> str: ...
    def info(self, submission_id: str) -> RayJobInfo: ...
    def stop(self, submission_id: str) -> None: ...
    def logs(self, submission_id: str) -> str: ...


def with_retries(fn: Callable[[], T], *, attempts: int, backoff_s: float, backoff_max_s: float,
                 what: str, on_failure: Callable[[TransientError], None] | None = None) -> T:
    """Call fn; on TransientError wait backoff_s, 2*backoff_s, ... (capped) and try again, `attempts` in all."""
    delay = backoff_s
    for i in range(attempts):
        try:
            return fn()
        except TransientError as e:
            if on_failure is not None:
                on_failure(e)
            if i == attempts - 1:
                raise
            log.warning("%s failed (try %d of %d), retrying in %.1fs: %s", what, i + 1, attempts, delay, e)
            time.sleep(delay)
            delay = min(delay * 2, backoff_max_s)
    raise AssertionError("unreachable")


def _ray_client_class():
    # Imported lazily: ray.job_submission costs ~1 s of import time, which the CLI and the unit tests skip.
    from ray.job_submission import JobSubmissionClient

    class TimeoutJobSubmissionClient(JobSubmissionClient):
        """Ray's client sends requests without a timeout: a hung job server would hang the reconciler."""

        _flowbp_timeout_s = 10.0

        def _do_request(self, method, endpoint, **kwargs):
            kwargs.setdefault("timeout", self._flowbp_timeout_s)
            return super()._do_request(method, endpoint, **kwargs)

    return TimeoutJobSubmissionClient


class RayJobBackend:
    """Ray's JobSubmissionClient, created lazily and re-created after a connection failure."""

    def __init__(self, settings: ControllerSettings):
        self.address = settings.ray_address
        self.timeout_s = settings.ray_timeout_s
        self._client = None

    def _get(self):
        if self._client is None:
            cls = _ray_client_class()
            cls._flowbp_timeout_s = self.timeout_s
            try:
                self._client = cls(self.address)
            except (ConnectionError, requests.RequestException) as e:
                raise TransientError(f"Ray job server unreachable at {self.address}: {_short(e)}") from None
            except RuntimeError as e:
                raise TransientError(f"Ray job server at {self.address} is not ready: {_short(e)}") from None
        return self._client

    def _call(self, what: str, fn: Callable[[Any], T]) -> T:
        client = self._get()
        try:
            return fn(client)
        except (ConnectionError, requests.RequestException) as e:
            self._client = None
            raise TransientError(f"Ray job server unreachable at {self.address} ({what}): {_short(e)}") from None
        except RuntimeError as e:
            code = _status_code(str(e))
            if code == 404 or "does not exist" in str(e):
                raise UnknownRayJob(f"Ray has no such job ({what}): {_short(e)}") from None
            if code is None or code >= 500 or "No available agent" in str(e):
                raise TransientError(f"Ray job server error ({what}): {_short(e)}") from None
            raise PermanentError(f"Ray refused {what}: {_short(e)}") from None

    def ping(self) -> None:
        self._call("version check", lambda c: c.get_version())

    def submit(self, req: SubmitRequest) -> str:
        def go(c):
            try:
                return c.submit_job(entrypoint=req.entrypoint, submission_id=req.submission_id,
                                    runtime_env=req.runtime_env or None, metadata=req.metadata)
            except RuntimeError as e:
                if "already exists" in str(e):  # an earlier try of this same attempt reached Ray
                    return req.submission_id
                raise
        return self._call(f"submit {req.submission_id}", go)

    def info(self, submission_id: str) -> RayJobInfo:
        d = self._call(f"status of {submission_id}", lambda c: c.get_job_info(submission_id))
        status = d.status.value if hasattr(d.status, "value") else str(d.status)
        # Ray appends up to 20,000 characters of log to a failure message: keep records and reasons readable
        # (the whole log stays available from the logs route).
        return RayJobInfo(status=status, message=_clip(d.message), error_type=getattr(d, "error_type", None))

    def stop(self, submission_id: str) -> None:
        self._call(f"stop {submission_id}", lambda c: c.stop_job(submission_id))

    def logs(self, submission_id: str) -> str:
        return self._call(f"logs of {submission_id}", lambda c: c.get_job_logs(submission_id))


def _clip(msg: str | None, limit: int = 400) -> str | None:
    if msg is None or len(msg) <= limit:
        return msg
    head = msg.split(", last available logs", 1)[0]
    return head if len(head) <= limit else head[:limit] + "..."


def _status_code(msg: str) -> int | None:
    marker = "status code "
    if marker in msg:
        digits = msg.split(marker, 1)[1][:3]
        if digits.isdigit():
            return int(digits)
    return None


def _short(e: BaseException, limit: int = 300) -> str:
    s = f"{type(e).__name__}: {e}" if not str(e).startswith(type(e).__name__) else str(e)
    return s if len(s) <= limit else s[:limit] + "..."
