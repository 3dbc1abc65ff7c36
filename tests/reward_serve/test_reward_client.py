"""The served reward's client and batch limit without a cluster: a fake Serve handle records what is sent."""

from __future__ import annotations

import torch

from services.reward_serve.client import ServedRewardClient
from services.reward_serve.protocol import RewardRequest, RewardResponse


class _Pending:
    def __init__(self, handle, i: int, payload: bytes):
        self.handle, self.i, self.payload = handle, i, payload

    def result(self, timeout_s: float) -> bytes:
        if self.i in self.handle.time_out:
            raise TimeoutError(f"request {self.i}")
        req = RewardRequest.from_bytes(self.payload)
        x = req.input.float()
        return RewardResponse(rewards=x.flatten(1).mean(1), grad=torch.ones_like(x), deployment="fake").to_bytes()

    def cancel(self) -> None:
        self.handle.events.append(("cancel", self.i))


class _Handle:
    """Stands in for a Serve app handle: `score.remote(payload)`; requests in `time_out` time out."""

    def __init__(self, time_out=()):
        self.time_out, self.events, self.sizes = set(time_out), [], []
        self.score = self

    def remote(self, payload: bytes) -> _Pending:
        i = len(self.sizes)
        self.sizes.append(RewardRequest.from_bytes(payload).input.shape[0])
        self.events.append(("submit", i))
        return _Pending(self, i, payload)


def _client(handle: _Handle, **kw) -> ServedRewardClient:
    client = ServedRewardClient("fake", retries=2, timeout_s=1.0, backoff_s=0.0, **kw)
    client._handle = handle
    return client


def test_a_timed_out_reward_request_is_cancelled_before_it_is_retried():
    handle = _Handle(time_out={0})
    x = torch.randn(2, 4, 8, 8)
    resp = _client(handle).call(x, ["a", "b"])
    assert handle.events == [("submit", 0), ("cancel", 0), ("submit", 1)]
    torch.testing.assert_close(resp.rewards, x.flatten(1).mean(1))


def test_a_call_larger_than_the_batch_limit_goes_as_requests_within_it():
    handle = _Handle()
    x = torch.randn(8, 4, 8, 8)
    resp = _client(handle, max_samples=3).call(x, [str(i) for i in range(8)])
    assert handle.sizes == [3, 3, 2]
    torch.testing.assert_close(resp.rewards, x.flatten(1).mean(1))
    assert resp.grad.shape == x.shape


def test_the_serve_batch_limit_counts_samples_not_requests():
    from services.reward_serve.deployment import _samples

    four = RewardRequest(input=torch.zeros(4, 4, 8, 8), prompts=tuple("abcd")).to_bytes()
    two = RewardRequest(input=torch.zeros(2, 4, 8, 8), prompts=("a", "b")).to_bytes()
    assert _samples([four, two, b"not a request"]) == 7
