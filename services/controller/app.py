"""The FastAPI app: /v1 job API, /healthz, /readyz, /metrics (and /openapi.json), all but the health checks
behind a bearer token.

`create_app(settings)` builds everything (store, backend, metrics, reconciler) so tests and the benchmark run
real apps side by side; `python -m services.controller.app` serves one with uvicorn from FLOWBP_* settings.
Handlers are plain `def`s (Redis and Ray calls block) wrapped by `offload`, which runs each in the thread pool.
"""

from __future__ import annotations

import functools
import json
import logging
import secrets
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from .auth import RequireToken, TokenStore
from .metrics import ControllerMetrics
from .middleware import BodySizeLimit, RequestMetrics
from .models import (InvalidTransition, JobCheckpoints, JobDetail, JobMetrics, JobPage, JobRecord, JobState,
                     JobSummary, LogChunk, LoraLink, Transition)
from .reconciler import Reconciler, submission_id
from .runs import run_folder
from .settings import ControllerSettings
from .spec import JobSubmitRequest, SpecError, check_spec
from .store import IdempotencyConflict, JobNotFound, JobStore, RunBusy, StoreUnavailable
from .submission import JobBackend, PermanentError, RayJobBackend, TransientError, UnknownRayJob

log = logging.getLogger("flowbp.controller")

API_VERSION = "v1"
MAX_PAGE = 500  # largest page of GET /v1/jobs


def offload(fn):
    """Run a blocking handler (Redis, Ray, files) in the thread pool as ONE hop. FastAPI would do that by itself
    for a plain `def`, but then also validates and serializes the response in a second hop; on a 2-core
    machine the hops were most of a status call's CPU."""

    @functools.wraps(fn)  # FastAPI reads the parameters through __wrapped__
    async def handler(*args, **kwargs):
        return await run_in_threadpool(fn, *args, **kwargs)

    return handler


def new_job_id() -> str:
    return f"job-{secrets.token_hex(6)}"


class Controller:
    """What the handlers share; one per app."""

    def __init__(self, settings: ControllerSettings, tokens: TokenStore, backend: JobBackend | None):
        self.settings = settings
        self.tokens = tokens
        self.store = JobStore(settings.redis_url, settings.redis_prefix, settings.redis_timeout_s)
        self.metrics = ControllerMetrics(self.store)
        self.backend = backend if backend is not None else RayJobBackend(settings)
        self.reconciler = Reconciler(settings, self.store, self.backend, self.metrics)


def _error(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def _encodable_error(err: dict) -> dict:
    """One 422 entry as JSON can carry it: the input and context are echoed only when they encode (NaN does not)."""
    out = {"type": err["type"], "loc": list(err["loc"]), "msg": err["msg"]}
    for key in ("input", "ctx"):
        if key not in err:
            continue
        try:
            value = jsonable_encoder(err[key])
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError):
            continue
        out[key] = value
    return out


def create_app(settings: ControllerSettings, *, tokens: TokenStore | None = None,
               backend: JobBackend | None = None) -> FastAPI:
    tokens = tokens if tokens is not None else TokenStore.from_settings(settings)
    ctl = Controller(settings, tokens, backend)
    auth = RequireToken(tokens)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if settings.check_registries:
            # Import the registries (and torch) now, off the event loop, so the first submit is not the one
            # that waits seconds for them.
            threading.Thread(target=_warm_registries, name="flowbp-warm-registries", daemon=True).start()
        if settings.reconciler_enabled:
            ctl.reconciler.start()
        log.info("controller up: redis %s, ray %s", ctl.store.url, settings.ray_address)
        yield
        if settings.reconciler_enabled:
            ctl.reconciler.stop()
        ctl.store.close()

    app = FastAPI(title="FlowBP controller", version="1", lifespan=lifespan, openapi_url=None, docs_url=None,
                  redoc_url=None,
                  description="Submit and follow FlowBP alignment jobs. Every route but /healthz and /readyz "
                              "needs `Authorization: Bearer <token>`.")
    app.state.controller = ctl

    # ---- errors: one JSON shape, {"detail": ...}; never a token or a stack trace ----
    @app.exception_handler(StoreUnavailable)
    async def _redis_down(request: Request, exc: StoreUnavailable):
        ctl.metrics.redis_up.set(0)
        return _error(503, f"job store unavailable: {exc}; retry shortly", {"Retry-After": "2"})

    @app.exception_handler(JobNotFound)
    async def _not_found(request: Request, exc: JobNotFound):
        return _error(404, str(exc))

    @app.exception_handler(InvalidTransition)
    async def _conflict(request: Request, exc: InvalidTransition):
        return _error(409, str(exc))

    @app.exception_handler(RunBusy)
    async def _run_busy(request: Request, exc: RunBusy):
        return _error(409, str(exc))

    @app.exception_handler(IdempotencyConflict)
    async def _idem(request: Request, exc: IdempotencyConflict):
        return _error(409, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return JSONResponse({"detail": [_encodable_error(e) for e in exc.errors()]}, status_code=422)

    @app.exception_handler(SpecError)
    async def _spec(request: Request, exc: SpecError):
        return JSONResponse({"detail": [exc.detail()]}, status_code=422)

    v1 = APIRouter(prefix=f"/{API_VERSION}", dependencies=[Depends(auth)], tags=["jobs"])
    job_responses = {404: {"description": "no such job"}, 401: {"description": "missing or invalid token"},
                     503: {"description": "Redis unavailable"}}

    @v1.post("/jobs", status_code=201, response_model=JobDetail,
             responses={200: {"description": "replay of an earlier submit with the same Idempotency-Key",
                              "model": JobDetail},
                        409: {"description": "Idempotency-Key reused with another body, or run_id in use"},
                        413: {"description": "body too large"}, 422: {"description": "invalid spec"}})
    @offload
    def submit_job(body: JobSubmitRequest, response: Response,
                   idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", min_length=1,
                                                                 max_length=255, pattern=r"^[\x21-\x7e]+$")] = None
                   ) -> JobDetail:
        """Accept a job (state `pending`); the reconciler submits it to Ray when a slot is free."""
        check_spec(body, settings.limits, settings.check_registries)
        job_id = new_job_id()
        config = body.config.to_dict()
        # The run id names the checkpoint folder: fixed now, so every resubmission resumes the same run.
        config["run_id"] = config.get("run_id") or job_id
        # Checkpoints go where this controller reads them (shared storage in a cluster).
        config["checkpoint"]["dir"] = str(settings.runs_dir.resolve())
        now = time.time()
        rec = JobRecord(id=job_id, name=body.name, labels=body.labels, run_id=config["run_id"], created_at=now,
                        updated_at=now, history=[Transition(state=JobState.pending, at=now, reason="accepted")],
                        config=config, max_resubmits=(settings.max_resubmits if body.max_resubmits is None
                                                      else body.max_resubmits))
        rec, created = ctl.store.create(rec, idempotency_key, body.body_hash())
        response.status_code = 201 if created else 200
        if created:
            ctl.reconciler.wake()
        return JobDetail.of(rec)

    @v1.get("/jobs", response_model=JobPage, responses=job_responses)
    @offload
    def list_jobs(state: Annotated[list[JobState] | None, Query(description="repeat to match any")] = None,
                  name: Annotated[str | None, Query(max_length=63)] = None,
                  label: Annotated[list[str] | None, Query(description="key=value; repeat to match all")] = None,
                  cursor: Annotated[int, Query(ge=0, le=10**9)] = 0,
                  limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50) -> JobPage:
        """Jobs, newest first, filtered by state, name and labels; page with `cursor`."""
        labels = {}
        for i, item in enumerate(label or []):
            if "=" not in item:
                raise SpecError(("query", "label", i), f"label filter {item!r} must look like key=value",
                                "label_filter")
            k, v = item.split("=", 1)
            labels[k] = v
        recs, nxt = ctl.store.list(states=state, labels=labels, name=name, cursor=cursor, limit=limit)
        return JobPage(jobs=[JobSummary.of(r) for r in recs], next_cursor=nxt)

    @v1.get("/jobs/{job_id}", response_model=JobDetail, responses=job_responses)
    @offload
    def get_job(job_id: str) -> JobDetail:
        return JobDetail.of(ctl.store.get(job_id))

    @v1.post("/jobs/{job_id}/cancel", response_model=JobDetail,
             responses={**job_responses, 409: {"description": "the job already finished"}})
    @offload
    def cancel_job(job_id: str) -> JobDetail:
        """Cancel a job: a pending one never reaches Ray; a submitted or running one is stopped on Ray."""

        def change(r: JobRecord) -> None:
            on_ray = r.state in (JobState.submitted, JobState.running)
            r.transition(JobState.cancelled, "cancelled by request" + ("; stopping the Ray job" if on_ray else ""))
            r.cancel_requested = True
            r.stop_pending = on_ray

        rec = ctl.store.mutate(job_id, change)
        if rec.stop_pending and rec.ray_submission_id:
            try:  # one quick try now; the reconciler retries while Ray is unreachable
                ctl.backend.stop(rec.ray_submission_id)
                stopped = True
            except UnknownRayJob:
                stopped = True
            except (TransientError, PermanentError) as e:
                log.warning("job %s: Ray stop deferred: %s", job_id, e)
                stopped = False
            if stopped:
                rec = ctl.store.mutate(job_id, lambda r: setattr(r, "stop_pending", False))
            else:
                ctl.reconciler.wake()
        return JobDetail.of(rec)

    @v1.get("/jobs/{job_id}/logs", response_model=LogChunk,
            responses={**job_responses, 502: {"description": "Ray unreachable"}})
    @offload
    def job_logs(job_id: str,
                 offset: Annotated[int | None, Query(ge=0, le=10**12, description="from this character on "
                                                                                  "(follow)")] = None,
                 tail: Annotated[int, Query(ge=1, le=100_000, description="last lines, when no offset")] = 200,
                 submission: Annotated[str | None, Query(max_length=200, description="one attempt's Ray submission "
                                                         "id (default: the current attempt)")] = None
                 ) -> LogChunk:
        """The Ray job's log (the current attempt, or `submission`'s): the last `tail` lines, or everything after
        `offset`. A follower names its submission, so that a resubmission between two reads cannot switch logs
        under it."""
        rec = ctl.store.get(job_id)
        sub = submission or rec.ray_submission_id
        if sub is None:
            return LogChunk(job_id=job_id, ray_submission_id=None, text="", offset=0)
        attempts = [submission_id(job_id, n) for n in range(1, rec.attempts + 1)]
        if sub not in attempts:
            return _error(404, f"submission={sub!r} is not an attempt of job {job_id}: expected one of {attempts}")
        try:
            text = ctl.backend.logs(sub)
        except UnknownRayJob:
            return _error(404, f"Ray no longer has logs for {sub}")
        except (TransientError, PermanentError) as e:
            return _error(502, f"cannot read logs from Ray: {e}")
        cap = settings.limits.max_log_bytes
        if offset is None:
            chunk = "".join(text.splitlines(keepends=True)[-tail:])[-cap:]
            end = len(text)
        else:
            chunk = text[offset:offset + cap]
            end = min(len(text), offset + len(chunk)) if offset <= len(text) else len(text)
        return LogChunk(job_id=job_id, ray_submission_id=sub, text=chunk, offset=end)

    @v1.get("/jobs/{job_id}/metrics", response_model=JobMetrics, responses=job_responses)
    @offload
    def job_metrics(job_id: str, last: Annotated[int, Query(ge=1, le=100_000)] = 1000) -> JobMetrics:
        """Per-step training metrics of the run (runs/<run_id>/metrics.jsonl, or the step rows of events.jsonl):
        the latest row and the history."""
        rec = ctl.store.get(job_id)
        rows = run_folder(settings.runs_dir, rec.run_id).metrics(last=last)
        return JobMetrics(job_id=job_id, run_id=rec.run_id, latest=rows[-1] if rows else None, history=rows)

    @v1.get("/jobs/{job_id}/checkpoints", response_model=JobCheckpoints, responses=job_responses)
    @offload
    def job_checkpoints(job_id: str) -> JobCheckpoints:
        rec = ctl.store.get(job_id)
        folder = run_folder(settings.runs_dir, rec.run_id)
        return JobCheckpoints(job_id=job_id, run_id=rec.run_id, checkpoints=folder.checkpoints(),
                              latest_complete=folder.latest_complete())

    def _lora(job_id: str) -> tuple[JobRecord, int, Path, str]:
        rec = ctl.store.get(job_id)
        lora_run = rec.config.get("backbone", {}).get("finetune", "lora") == "lora"
        found = run_folder(settings.runs_dir, rec.run_id).lora_file(lora_run)
        if found is None:
            raise _NoLora(job_id)
        ref, path, fmt = found
        return rec, ref.step, path, fmt

    @v1.get("/jobs/{job_id}/lora", response_model=LoraLink, responses=job_responses)
    @offload
    def lora_link(job_id: str, request: Request) -> LoraLink:
        """Where to download the trained LoRA of the newest complete checkpoint."""
        _, step, path, fmt = _lora(job_id)
        return LoraLink(job_id=job_id, step=step, file=path.name, bytes=path.stat().st_size, format=fmt,
                        url=str(request.url_for("download_lora", job_id=job_id)))

    @v1.get("/jobs/{job_id}/lora/download", name="download_lora", response_class=FileResponse,
            responses={**job_responses, 200: {"content": {"application/octet-stream": {}}}})
    @offload
    def download_lora(job_id: str):
        _, step, path, _ = _lora(job_id)
        return FileResponse(path, media_type="application/octet-stream", filename=f"{job_id}-step{step}-{path.name}")

    @app.exception_handler(_NoLora)
    async def _no_lora(request: Request, exc: _NoLora):
        return _error(404, str(exc))

    app.include_router(v1)

    # ---- health, readiness, metrics, schema ----
    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers (no dependency is checked)."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], responses={503: {"description": "Redis or Ray unreachable"}})
    @offload
    def readyz():
        """Readiness: Redis answers a PING and Ray's job server answers a version check."""
        checks: dict[str, str] = {}
        try:
            ctl.store.ping()
            checks["redis"] = "ok"
            ctl.metrics.redis_up.set(1)
        except StoreUnavailable as e:
            checks["redis"] = str(e)
            ctl.metrics.redis_up.set(0)
        try:
            ctl.backend.ping()
            checks["ray"] = "ok"
            ctl.metrics.ray_up.set(1)
        except (TransientError, PermanentError) as e:
            checks["ray"] = str(e)
            ctl.metrics.ray_up.set(0)
        ok = all(v == "ok" for v in checks.values())
        return JSONResponse({"status": "ok" if ok else "unavailable", "checks": checks},
                            status_code=200 if ok else 503)

    @app.get("/metrics", tags=["health"], dependencies=[Depends(auth)], response_class=PlainTextResponse)
    @offload
    def metrics():
        return Response(generate_latest(ctl.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(auth)])
    async def openapi():
        return JSONResponse(app.openapi())

    app.add_middleware(BodySizeLimit, max_bytes=settings.limits.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=ctl.metrics)
    return app


class _NoLora(LookupError):
    def __init__(self, job_id: str):
        super().__init__(job_id)
        self.job_id = job_id

    def __str__(self) -> str:
        return f"job {self.job_id} has no complete checkpoint with a LoRA file yet"


def _warm_registries() -> None:
    try:
        from flowbp_core import backbones, methods, rewards  # noqa: F401
    except Exception:  # the first submit will report it with its field path
        log.exception("importing the backbone/method/reward registries failed")


def main() -> None:
    import uvicorn

    settings = ControllerSettings.from_env()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    # uvicorn's own access log is off: ours (middleware.py) logs route templates, never query strings.
    uvicorn.run(app, host=settings.host, port=settings.port, access_log=False, log_level=settings.log_level)


if __name__ == "__main__":
    main()
