"""The engine on the real tiny SD3 backbone (true CFG, negative branch detached): value pinned, gradient reaches
the transformer, and the cache crosses a byte boundary on the way."""

import pytest
import torch

from flowbp_core import methods
from flowbp_core.cache import TrajectoryCache
from flowbp_core.sampling import rollout


@pytest.fixture(scope="module")
def sd3():
    from flowbp_core.backbones import build

    return build("sd3", tiny=True, seed=0)


@pytest.mark.parametrize("name", ["flowbp_sparse", "flowbp_lagrange", "draft_k"])
def test_endpoint_on_tiny_sd3(sd3, name):
    prompts = ["a red cube", "a blue ball"]
    cond = sd3.encode_prompts(prompts)
    velocity = sd3.bind(cond)
    m = methods.build(name, backbone="sd35")
    plan = m.plan(8, torch.Generator().manual_seed(0))
    noise = torch.randn(sd3.latent_shape(2), generator=torch.Generator().manual_seed(0))
    cache = rollout(velocity, noise, sd3.schedule(8).sigmas, cond=cond, prompts=prompts, plan=plan)
    cache = TrajectoryCache.from_bytes(cache.to_bytes())
    ep = m.endpoint(cache, sd3.bind(cache.cond))
    assert torch.equal(ep.value.detach(), cache.final)
    params = sd3.trainable_parameters()
    for p in params:
        p.grad = None
    (sd3.decode(ep.value).mean(dim=(1, 2, 3)) * ep.weights).sum().backward()
    grads = [p.grad for p in params if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
