"""Fast checks of the reward service's pieces without a Ray cluster: the wire format, the engine, and the served
reward's backward (the import direction is tests/test_lint.py's)."""

from __future__ import annotations

import pytest
import torch

from services.reward_serve.client import served_reward
from services.reward_serve.engine import RewardEngine, RewardServiceSpec
from services.reward_serve.protocol import RewardRequest, RewardResponse, WireError


# ------------------------------------------------------------------------------------------ wire format
def test_request_and_response_round_trip_as_safetensors():
    x = torch.randn(2, 4, 8, 8)
    req = RewardRequest(input=x, prompts=("a cat", "a dog"), kind="latents", want_grad=True)
    blob = req.to_bytes()
    assert not blob.startswith(b"\x80"), "pickle protocol header: payloads must be safetensors"
    back = RewardRequest.from_bytes(blob)
    assert torch.equal(back.input, x) and back.prompts == ("a cat", "a dog") and back.want_grad
    resp = RewardResponse(rewards=torch.tensor([0.5, 1.5]), grad=torch.ones(2, 4, 8, 8), deployment="dep")
    r2 = RewardResponse.from_bytes(resp.to_bytes())
    assert torch.equal(r2.rewards, resp.rewards) and torch.equal(r2.grad, resp.grad) and r2.deployment == "dep"


@pytest.mark.parametrize("bad, match", [
    (b"short", "not a safetensors blob"),
    (RewardResponse(rewards=torch.zeros(1), grad=None).to_bytes(), "expected a reward_request"),
])
def test_bad_payloads_are_rejected_with_a_reason(bad, match):
    with pytest.raises(WireError, match=match):
        RewardRequest.from_bytes(bad)


def test_unknown_version_is_rejected():
    blob = RewardRequest(input=torch.zeros(1, 3, 4, 4), prompts=("x",), kind="images").to_bytes()
    tampered = blob.replace(b'"format_version":"1"', b'"format_version":"9"')
    assert tampered != blob
    with pytest.raises(WireError, match="format_version='9'"):
        RewardRequest.from_bytes(tampered)


def test_request_validation_names_the_problem():
    with pytest.raises(WireError, match="2 inputs but 1 prompts"):
        RewardRequest(input=torch.zeros(2, 3, 4, 4), prompts=("x",), kind="images")
    with pytest.raises(WireError, match="kind='pixels'"):
        RewardRequest(input=torch.zeros(1, 3, 4, 4), prompts=("x",), kind="pixels")


# ------------------------------------------------------------------------------------------ engine
def _engine():
    return RewardEngine(RewardServiceSpec(panel=(("saturation", 0.6), ("contrast", 0.4)), name="t"))


def test_engine_batches_requests_and_returns_per_sample_gradients():
    eng = _engine()
    g = torch.Generator().manual_seed(0)
    xs = [torch.rand(n, 3, 8, 8, generator=g) for n in (1, 3)]
    prompts = [("a",), ("b", "c", "d")]
    out = eng.run([RewardRequest(input=x, prompts=p, kind="images") for x, p in zip(xs, prompts)])
    for x, p, o in zip(xs, prompts, out):
        for b in range(x.shape[0]):
            xb = x[b : b + 1].clone().requires_grad_(True)
            r = eng.reward(xb, [p[b]])
            (gb,) = torch.autograd.grad(r.sum(), xb)
            torch.testing.assert_close(o.rewards[b], r.detach()[0])
            torch.testing.assert_close(o.grad[b], gb[0])


def test_engine_without_decoder_refuses_latents():
    with pytest.raises(WireError, match="has no decoder"):
        _engine().run([RewardRequest(input=torch.zeros(1, 4, 8, 8), prompts=("x",), kind="latents")])


class _InProcessClient:
    """The real engine behind the client interface (what a Serve replica runs), without Serve."""

    def __init__(self, engine):
        self.engine = engine

    def call(self, x, prompts, want_grad=True):
        sent = RewardRequest(input=x.detach(), prompts=tuple(prompts), kind="images", want_grad=want_grad)
        req = RewardRequest.from_bytes(sent.to_bytes())
        return RewardResponse.from_bytes(self.engine.run([req])[0].to_bytes())


def test_served_reward_function_seeds_the_backward_like_autograd():
    eng = _engine()
    w = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3), requires_grad=True)
    prompts = ["p", "q"]
    weights = torch.tensor([0.3, -1.7])

    def images():
        return torch.sigmoid(w * 2.0)

    (g_direct,) = torch.autograd.grad((weights * eng.reward(images(), prompts)).sum(), w)
    (g_served,) = torch.autograd.grad((weights * served_reward(images(), prompts, _InProcessClient(eng))).sum(), w)
    torch.testing.assert_close(g_served, g_direct)
