"""Learner side of the served reward: a retrying client and the autograd Function that seeds the backward.

`served_reward(x, prompts, client)` returns r (shape [B]) whose backward is grad_r[b] * (d r_b / d x_b), the
per-sample input gradient the service computed. The learner's graph then continues from x (the surrogate
endpoint) into the backbone, exactly as if the reward had been computed in place ("colocated").
"""

from __future__ import annotations

import logging
import time

import ray
import torch

from services.reward_serve.protocol import RewardRequest, RewardResponse

log = logging.getLogger("flowbp.reward_serve")

# A replica that died (or is being replaced) surfaces as one of these; the request is safe to repeat, because
# scoring is a pure function of the payload.
RETRYABLE = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, ray.exceptions.ActorDiedError,
             TimeoutError)


class ServedRewardClient:
    """Calls a reward app through its Serve handle with retries. `app_name` names the Serve application."""

    def __init__(self, app_name: str, kind: str = "latents", retries: int = 5, timeout_s: float = 120.0,
                 backoff_s: float = 0.5, max_samples: int | None = None):
        self.app_name = app_name
        self.max_samples = max_samples  # the service's batch limit: a larger call is sent as several requests
        self.kind = kind
        self.retries = retries
        self.timeout_s = timeout_s
        self.backoff_s = backoff_s
        self._handle = None
        self.retried = 0

    def _get_handle(self):
        if self._handle is None:
            from ray import serve

            self._handle = serve.get_app_handle(self.app_name)
        return self._handle

    def call(self, x: torch.Tensor, prompts: list[str], want_grad: bool = True) -> RewardResponse:
        """Score `x`: in requests of at most `max_samples` samples, sent together, joined in order."""
        n = self.max_samples or x.shape[0]
        payloads = [RewardRequest(input=x[i:i + n].detach(), prompts=tuple(prompts[i:i + n]), kind=self.kind,
                                  want_grad=want_grad).to_bytes()
                    for i in range(0, x.shape[0], n)]
        pending = [self._get_handle().score.remote(p) for p in payloads]
        parts = [self._result(p, r) for p, r in zip(payloads, pending)]
        if len(parts) == 1:
            return parts[0]
        grads = [r.grad for r in parts]
        return RewardResponse(rewards=torch.cat([r.rewards for r in parts]),
                              grad=None if any(g is None for g in grads) else torch.cat(grads),
                              deployment=parts[0].deployment)

    def _result(self, payload: bytes, pending) -> RewardResponse:
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            if attempt > 0:
                time.sleep(self.backoff_s * attempt)
                pending = self._get_handle().score.remote(payload)
            try:
                return RewardResponse.from_bytes(pending.result(timeout_s=self.timeout_s))
            except RETRYABLE as e:
                last = e
                self.retried += 1
                # A timed-out request still holds its place in a batch: cancel it before asking again.
                pending.cancel()
                log.warning("reward app %s: attempt %d failed (%s); retrying", self.app_name, attempt + 1,
                            type(e).__name__)
        raise RuntimeError(f"reward app {self.app_name!r} failed {self.retries + 1} times: {last}") from last

    def __call__(self, x: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return served_reward(x, prompts, self)


class _ServedReward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, prompts, client: ServedRewardClient):  # noqa: D401
        resp = client.call(x, list(prompts), want_grad=x.requires_grad)
        ctx.save_for_backward(resp.grad.to(x.device, x.dtype) if resp.grad is not None else torch.empty(0))
        return resp.rewards.to(x.device, torch.float32)

    @staticmethod
    def backward(ctx, grad_r: torch.Tensor):
        (g,) = ctx.saved_tensors
        if g.numel() == 0:
            return None, None, None
        shape = (-1,) + (1,) * (g.dim() - 1)
        return grad_r.to(g.dtype).reshape(shape) * g, None, None


def served_reward(x: torch.Tensor, prompts: list[str], client: ServedRewardClient) -> torch.Tensor:
    return _ServedReward.apply(x, tuple(prompts), client)
