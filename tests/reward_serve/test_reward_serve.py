"""The served reward on a real Ray Serve: same parameter gradient as colocated, retried through a replica kill."""

from __future__ import annotations

import threading

import pytest
import torch

from tests.tiny_runs import tiny_cfg
from tests.waiting import wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    from flowbp_core.run import build_components, rollout_for

    cfg = tiny_cfg(tmp_path_factory.mktemp("serve"), "serve", reward={
        "terms": [{"name": "saturation", "weight": 0.7}, {"name": "contrast", "weight": 0.3}],
        "loss": "hinge", "clip": 0.9, "placement": "colocated"})
    comp = build_components(cfg)
    cache = rollout_for(comp, step=0, policy_version=0)
    return cfg, comp, cache


def _param_grad(comp, cache, score) -> tuple[float, list[torch.Tensor]]:
    """The step's loss and parameter gradient; a zero learning rate leaves the shared weights as they were."""
    from flowbp_core.reducers import NoReduce
    from flowbp_core.step import learn_step

    class KeepGrads(NoReduce):
        def gradients(self, params):
            self.grads = [p.grad.detach().clone() for p in params]
            return super().gradients(params)

    keep = KeepGrads()
    opt = torch.optim.SGD(comp.backbone.trainable_parameters(), lr=0.0)
    res = learn_step(cache, comp, step=0, optimizer=opt, score=score, reducer=keep)
    assert not res.skipped, res.skip_reason
    return res.loss, keep.grads


@pytest.mark.parametrize("decode_on_reward_side", [True, False])
def test_served_and_colocated_give_the_same_parameter_gradient(ray_client, parts, decode_on_reward_side):
    from services.reward_serve import deployment
    from services.reward_serve.engine import DecoderSpec, RewardServiceSpec
    from services.runtime.components import build_score, reward_panel

    cfg, comp, cache = parts
    app = f"grad-{int(decode_on_reward_side)}"
    panel, kwargs = reward_panel(cfg)
    spec = RewardServiceSpec(panel=panel, reward_kwargs=kwargs,
                             decoder=DecoderSpec(backbone="sd3", tiny=True) if decode_on_reward_side else None,
                             name=app)
    deployment.deploy(spec, app_name=app, route_prefix=f"/{app}", num_cpus=0.25)
    try:
        served_cfg = cfg.model_copy(deep=True)
        served_cfg.reward.placement = "served"
        served_cfg.reward.served.decode_on_reward_side = decode_on_reward_side
        served, _ = build_score(served_cfg, comp, app)
        loss_c, g_c = _param_grad(comp, cache, comp.score_fn())
        loss_s, g_s = _param_grad(comp, cache, served)
        assert loss_s == pytest.approx(loss_c, rel=1e-5)
        assert any(g.abs().sum() > 0 for g in g_c), "the colocated gradient is zero: the check would be vacuous"
        for a, b in zip(g_c, g_s):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7)
    finally:
        deployment.shutdown_app(app)


def test_reward_replica_killed_mid_request_is_retried(ray_client):
    """A long batch wait keeps the request inside the replica; we kill the replica then. The client retries
    on the replacement replica and the call completes with the right values."""
    import ray

    from services.reward_serve import deployment
    from services.reward_serve.client import ServedRewardClient
    from services.reward_serve.engine import RewardEngine, RewardServiceSpec
    from services.reward_serve.protocol import RewardRequest

    app = "killme"
    # The batch wait holds the request in the replica long enough to kill it there, even on a loaded machine.
    spec = RewardServiceSpec(panel=(("saturation", 1.0),), name=app, max_batch_size=64, batch_wait_timeout_s=10.0)
    handle = deployment.deploy(spec, app_name=app, route_prefix=f"/{app}", num_cpus=0.25)
    try:
        pid0 = handle.pid.remote().result(timeout_s=120)
        replicas = [a for a in ray.util.list_named_actors(all_namespaces=True)
                    if a["name"].startswith(f"SERVE_REPLICA::{app}#")]
        assert len(replicas) == 1, replicas
        replica = ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"])
        images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
        client = ServedRewardClient(app, kind="images", retries=5, backoff_s=0.5)
        out = {}
        t = threading.Thread(target=lambda: out.setdefault("r", client.call(images, ["a", "b", "c"])), daemon=True)
        t.start()
        wait_for(lambda: handle.requests_in_flight.remote().result(timeout_s=60) >= 1, 120,
                 "the request to wait in the replica's batch queue")
        ray.kill(replica, no_restart=True)
        t.join(timeout=300)
        assert not t.is_alive(), "the request never completed"
        expected = RewardEngine(RewardServiceSpec(panel=(("saturation", 1.0),))).run(
            [RewardRequest(input=images, prompts=("a", "b", "c"), kind="images")])[0]
        torch.testing.assert_close(out["r"].rewards, expected.rewards)
        torch.testing.assert_close(out["r"].grad, expected.grad)
        assert client.retried >= 1
        assert handle.pid.remote().result(timeout_s=60) != pid0
    finally:
        deployment.shutdown_app(app)


def test_http_route_speaks_safetensors_and_rejects_bad_payloads(ray_client):
    import urllib.error
    import urllib.request

    from services.reward_serve import deployment
    from services.reward_serve.engine import RewardServiceSpec
    from services.reward_serve.protocol import MEDIA_TYPE, RewardRequest, RewardResponse

    app = "http-score"
    deployment.deploy(RewardServiceSpec(panel=(("saturation", 1.0),), name=app), app_name=app, route_prefix=f"/{app}",
                      num_cpus=0.25, score_only=True)
    try:
        url = deployment.http_url(f"/{app}")
        assert url.startswith("http://127.0.0.1:")
        images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
        body = RewardRequest(input=images, prompts=("a", "b"), kind="images", want_grad=True).to_bytes()
        req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": MEDIA_TYPE})
        with urllib.request.urlopen(req, timeout=60) as r:
            resp = RewardResponse.from_bytes(r.read())
        assert resp.rewards.shape == (2,) and resp.grad is None  # score-only: no gradient even when asked
        assert resp.deployment == app
        bad = urllib.request.Request(url, data=b"\x80\x04not-safetensors", method="POST")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(bad, timeout=60)
        assert e.value.code == 400 and b"safetensors" in e.value.read()
    finally:
        deployment.shutdown_app(app)
