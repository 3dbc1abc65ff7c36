"""Ray Serve deployments: `RewardValueAndGrad` (training: rewards and d reward / d input) and `RewardScore`
(evaluation: rewards only, no graph kept).

Both take the same safetensors request bytes, over HTTP (POST body, response body; no pickle) or through a Serve
handle (`handle.score.remote(bytes)`), and batch concurrent requests with `@serve.batch` (size and wait from the
spec). Replicas and GPUs come from the config through `deploy(...)`.
"""

from __future__ import annotations

import os
import time

from ray import serve
from ray.util import metrics as rm
from starlette.requests import Request
from starlette.responses import Response

from services.reward_serve.engine import RewardEngine, RewardServiceSpec
from services.reward_serve.protocol import MEDIA_TYPE, RewardRequest, WireError, request_samples
from services.reward_serve import metric_names as M

_SECONDS = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]
# Ray exports a histogram's _sum as each bucket's midpoint times its count: boundaries half-way between integers
# make a batch of 1-4 requests count as exactly its size (the dashboard's mean batch), larger ones to the bucket.
_SIZES = [0.5, 1.5, 2.5, 3.5, 4.5, 8.5, 16.5, 32.5, 64.5, 128.5]


def _samples(payloads: list[bytes]) -> int:
    return sum(request_samples(p) for p in payloads)


class _RewardBase:
    allow_grad = True

    def __init__(self, spec: RewardServiceSpec):
        self.spec = spec
        self.engine = RewardEngine(spec)
        self._batched.set_max_batch_size(spec.max_batch_size)
        self._batched.set_batch_wait_timeout_s(spec.batch_wait_timeout_s)
        self.req_seconds = rm.Histogram(M.REWARD_REQUEST_SECONDS, "reward request seconds", _SECONDS,
                                        tag_keys=("deployment",))
        self.batch_size = rm.Histogram(M.REWARD_BATCH_SIZE, "requests per reward batch", _SIZES,
                                       tag_keys=("deployment",))
        self.tags = {"deployment": spec.name}
        self.in_flight = 0

    # The batch limit counts samples, not requests: a request of 32 latents costs 32 times one of 1.
    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01, batch_size_fn=_samples)
    async def _batched(self, payloads: list[bytes]) -> list[bytes | Exception]:
        # One bad request must not fail its batch-mates: decode each alone, run the good ones together.
        self.batch_size.observe(len(payloads), tags=self.tags)
        reqs, out = [], [None] * len(payloads)
        for i, p in enumerate(payloads):
            try:
                reqs.append((i, RewardRequest.from_bytes(p)))
            except WireError as e:
                out[i] = e
        if reqs:
            try:
                resps = self.engine.run([r for _, r in reqs], allow_grad=self.allow_grad)
                for (i, _), resp in zip(reqs, resps):
                    out[i] = resp.to_bytes()
            except Exception as e:  # noqa: BLE001 - returned to each caller of this batch
                for i, _ in reqs:
                    out[i] = e
        return out

    async def score(self, payload: bytes) -> bytes:
        """Handle entry point: request bytes in, response bytes out."""
        t0 = time.perf_counter()
        self.in_flight += 1
        try:
            res = await self._batched(payload)
        finally:
            self.in_flight -= 1
        self.req_seconds.observe(time.perf_counter() - t0, tags=self.tags)
        if isinstance(res, Exception):
            raise res
        return res

    async def __call__(self, request: Request) -> Response:
        """HTTP entry point: POST the request bytes; 400 with a plain-text reason for a bad payload."""
        body = await request.body()
        try:
            return Response(await self.score(body), media_type=MEDIA_TYPE)
        except WireError as e:
            return Response(str(e), status_code=400, media_type="text/plain")

    def pid(self) -> int:
        return os.getpid()

    def requests_in_flight(self) -> int:
        """Requests this replica holds now (waiting for their batch or being scored)."""
        return self.in_flight


@serve.deployment(name="RewardValueAndGrad", max_ongoing_requests=64)
class RewardValueAndGrad(_RewardBase):
    allow_grad = True


@serve.deployment(name="RewardScore", max_ongoing_requests=64)
class RewardScore(_RewardBase):
    allow_grad = False


def deploy(spec: RewardServiceSpec, *, app_name: str, route_prefix: str, num_replicas: int = 1,
           num_cpus: float = 1.0, num_gpus: float = 0.0, resources: dict[str, float] | None = None,
           score_only: bool = False, http_port: int | None = None):
    """Start Serve on loopback (if it is not running) and run one reward app; returns its DeploymentHandle.
    `resources`: custom resources each replica requests (its worker group's, `placement.role_resources`)."""
    from services.localproc import free_port

    serve.start(http_options={"host": "127.0.0.1", "port": http_port or free_port()})
    cls = RewardScore if score_only else RewardValueAndGrad
    app = cls.options(num_replicas=num_replicas,
                      ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus,
                                         **({"resources": resources} if resources else {})}).bind(spec)
    return serve.run(app, name=app_name, route_prefix=route_prefix)


def http_url(route_prefix: str) -> str:
    """The loopback URL of an app's HTTP route on the running Serve (whatever port Serve was started with)."""
    from ray.serve.context import _get_global_client

    cfg = _get_global_client().http_config
    return f"http://{cfg.host}:{cfg.port}{route_prefix}"


def shutdown_app(app_name: str) -> None:
    try:
        serve.delete(app_name)
    except Exception:  # noqa: BLE001 - already gone
        pass
