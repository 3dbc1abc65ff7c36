"""Job records in Redis: create (with idempotency keys), read, list, and state changes as atomic transactions.

Keys (all under the configured prefix, default `flowbp:`):
    job:<id>            the JobRecord as JSON
    jobs                sorted set of every job id, scored by creation time (listing, paging)
    state:<state>       one sorted set per state (filters, the jobs-by-state gauge, the reconciler's work list)
    idem:<sha256(key)>  {"job_id", "body_hash"} of the first submit with that Idempotency-Key (expires in 7 days)
    run_checkpoints     hash run_id -> newest complete CheckpointRef (JSON)
    run_active:<run_id> the id of the one non-terminal job writing that run (deleted when it ends)
    stop_pending        set of cancelled job ids whose Ray job still has to be stopped
    lock:<name>         leases (one reconciler at a time across controller replicas)

Every write of a record goes through `mutate`: WATCH the record, apply the change in Python (the state machine
in models.py refuses illegal moves), then MULTI/EXEC the record and its state-index update together, retrying
when someone else wrote in between. So the indexes never disagree with the records, and two controllers (or the
API and the reconciler) never lose each other's updates. Redis itself runs with appendonly yes: a record
acknowledged to a client survives a Redis restart.

Any Redis outage surfaces as `StoreUnavailable` (the API turns it into 503); redis-py reconnects on the next
call, so the service recovers by itself when Redis returns.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Iterator

import redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.exceptions import WatchError
from redis.retry import Retry

from .models import CheckpointRef, JobRecord, JobState
from .settings import redact_url

IDEMPOTENCY_TTL_S = 7 * 24 * 3600

_RENEW = ("if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) "
          "else return 0 end")
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"


class StoreUnavailable(RuntimeError):
    """Redis cannot be reached (down, restarting, loading its AOF, or too slow)."""


class JobNotFound(KeyError):
    def __init__(self, job_id: str):
        super().__init__(job_id)
        self.job_id = job_id

    def __str__(self) -> str:
        return f"no job with id {self.job_id!r}"


class RunBusy(RuntimeError):
    """Another active job already writes this run folder."""

    def __init__(self, run_id: str, job_id: str):
        super().__init__(f"run_id {run_id!r} is in use by the active job {job_id}: two jobs writing one run folder "
                         "would corrupt it; wait for that job to end (or cancel it), or choose another run_id")
        self.run_id, self.job_id = run_id, job_id


class IdempotencyConflict(RuntimeError):
    """The Idempotency-Key was used before with a different request body."""


class JobStore:
    def __init__(self, url: str, prefix: str = "flowbp:", timeout_s: float = 2.0):
        self.url = redact_url(url)
        self.prefix = prefix
        # One quick retry on a fresh connection: after a Redis restart every pooled connection is dead, and the
        # first command on each would otherwise fail although Redis is back.
        self.r = redis.Redis.from_url(
            url, decode_responses=True, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 1), health_check_interval=30)
        self._renew = self.r.register_script(_RENEW)
        self._release = self.r.register_script(_RELEASE)

    # ---- keys ----
    def _k(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def _job_key(self, job_id: str) -> str:
        return self._k("job", job_id)

    def _state_key(self, state: JobState) -> str:
        return self._k("state", state.value)

    @contextlib.contextmanager
    def _available(self) -> Iterator[None]:
        try:
            yield
        except (RedisConnectionError, RedisTimeoutError) as e:
            # redis-py's messages name host and port, never the password.
            raise StoreUnavailable(f"Redis is unavailable at {self.url}: {e}") from None

    def ping(self) -> None:
        with self._available():
            self.r.ping()

    # ---- create / read ----
    def create(self, rec: JobRecord, idempotency_key: str | None = None,
               body_hash: str = "") -> tuple[JobRecord, bool]:
        """Store a new record; with an idempotency key already used, return (the first job, False) instead."""
        ikey = self._k("idem", hashlib.sha256(idempotency_key.encode()).hexdigest()) if idempotency_key else None
        rkey = self._k("run_active", rec.run_id)
        with self._available(), self.r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(rkey, *([ikey] if ikey else []))
                    if ikey:
                        seen = pipe.get(ikey)
                        if seen is not None:
                            first = json.loads(seen)
                            if first["body_hash"] != body_hash:
                                raise IdempotencyConflict(
                                    "this Idempotency-Key was already used with a different request body "
                                    f"(job {first['job_id']}); use a new key for a different job")
                            pipe.reset()
                            return self.get(first["job_id"]), False
                    holder = pipe.get(rkey)
                    if holder is not None:
                        raw = pipe.get(self._job_key(holder))
                        if raw is not None and not JobRecord.model_validate_json(raw).state.terminal:
                            raise RunBusy(rec.run_id, holder)
                    pipe.multi()
                    pipe.set(rkey, rec.id)
                    pipe.set(self._job_key(rec.id), rec.model_dump_json())
                    pipe.zadd(self._k("jobs"), {rec.id: rec.created_at})
                    pipe.zadd(self._state_key(rec.state), {rec.id: rec.created_at})
                    if ikey:
                        pipe.set(ikey, json.dumps({"job_id": rec.id, "body_hash": body_hash}), ex=IDEMPOTENCY_TTL_S)
                    pipe.execute()
                    return rec, True
                except WatchError:
                    continue

    def get(self, job_id: str) -> JobRecord:
        with self._available():
            raw = self.r.get(self._job_key(job_id))
        if raw is None:
            raise JobNotFound(job_id)
        return JobRecord.model_validate_json(raw)

    # ---- change ----
    def mutate(self, job_id: str, change: Callable[[JobRecord], bool | None]) -> JobRecord:
        """Apply `change` to the current record atomically. `change` edits the record in place (use
        `rec.transition` for state moves) and returns False to write nothing. Retries on concurrent writes."""
        key = self._job_key(job_id)
        with self._available(), self.r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    if raw is None:
                        raise JobNotFound(job_id)
                    rec = JobRecord.model_validate_json(raw)
                    before, stop_before = rec.state, rec.stop_pending
                    if change(rec) is False:
                        pipe.reset()
                        return rec
                    rec.version += 1
                    pipe.multi()
                    pipe.set(key, rec.model_dump_json())
                    if rec.stop_pending != stop_before:
                        (pipe.sadd if rec.stop_pending else pipe.srem)(self._k("stop_pending"), rec.id)
                    if rec.state != before and rec.state.terminal:
                        # Safe without a check: another job can claim the run only once this one is terminal.
                        pipe.delete(self._k("run_active", rec.run_id))
                    if rec.state != before:
                        pipe.zrem(self._state_key(before), rec.id)
                        pipe.zadd(self._state_key(rec.state), {rec.id: rec.created_at})
                    pipe.execute()
                    return rec
                except WatchError:
                    continue

    # ---- queries ----
    def list(self, states: list[JobState] | None = None, labels: dict[str, str] | None = None,
             name: str | None = None, cursor: int = 0, limit: int = 50) -> tuple[list[JobRecord], int | None]:
        """Newest first. `cursor` is a position in the scanned index (pages can shift when jobs arrive)."""
        index = self._state_key(states[0]) if states and len(states) == 1 else self._k("jobs")
        wanted = set(states) if states else None
        out: list[JobRecord] = []
        pos = cursor
        chunk = max(limit, 100)
        while len(out) < limit:
            with self._available():
                ids = self.r.zrevrange(index, pos, pos + chunk - 1)
            if not ids:
                return out, None
            for rec_id, rec in zip(ids, self._get_aligned(ids)):
                pos += 1
                if rec is None:
                    continue
                if wanted is not None and rec.state not in wanted:
                    continue
                if name is not None and rec.name != name:
                    continue
                if labels and any(rec.labels.get(k) != v for k, v in labels.items()):
                    continue
                out.append(rec)
                if len(out) == limit:
                    break
        with self._available():
            more = self.r.zrevrange(index, pos, pos)
        return out, (pos if more else None)

    def _get_aligned(self, ids: list[str]) -> list[JobRecord | None]:
        with self._available():
            raws = self.r.mget([self._job_key(i) for i in ids])
        return [None if r is None else JobRecord.model_validate_json(r) for r in raws]

    def ids_in_state(self, state: JobState, limit: int | None = None) -> list[str]:
        """Oldest first (the dispatcher serves pending jobs in arrival order)."""
        with self._available():
            return self.r.zrange(self._state_key(state), 0, -1 if limit is None else limit - 1)

    def ids_stop_pending(self) -> list[str]:
        """Cancelled jobs whose Ray job could not be told to stop yet."""
        with self._available():
            return sorted(self.r.smembers(self._k("stop_pending")))

    def count_by_state(self) -> dict[JobState, int]:
        with self._available(), self.r.pipeline(transaction=False) as pipe:
            for s in JobState:
                pipe.zcard(self._state_key(s))
            return dict(zip(JobState, pipe.execute()))

    # ---- run -> newest complete checkpoint ----
    def set_run_checkpoint(self, run_id: str, ref: CheckpointRef) -> None:
        with self._available():
            self.r.hset(self._k("run_checkpoints"), run_id, ref.model_dump_json())

    def run_checkpoint(self, run_id: str) -> CheckpointRef | None:
        with self._available():
            raw = self.r.hget(self._k("run_checkpoints"), run_id)
        return None if raw is None else CheckpointRef.model_validate_json(raw)

    # ---- leases ----
    def acquire_lease(self, name: str, owner: str, ttl_s: float) -> bool:
        """Take or renew the lease `name` for `owner`; False while someone else holds it."""
        key, ttl_ms = self._k("lock", name), max(1, int(ttl_s * 1000))
        with self._available():
            if self.r.set(key, owner, nx=True, px=ttl_ms):
                return True
            return bool(self._renew(keys=[key], args=[owner, ttl_ms]))

    def release_lease(self, name: str, owner: str) -> None:
        with self._available():
            self._release(keys=[self._k("lock", name)], args=[owner])

    def close(self) -> None:
        self.r.close()

