"""The same invariants on a CUDA device (skipped without one): everything the engine creates follows the cache."""

import pytest
import torch

from core_helpers import TinyMLP
from flowbp_core import methods
from flowbp_core.sampling import rollout
from flowbp_core.schedules import make_schedule

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("name", sorted(methods.names()))
def test_methods_run_on_cuda_with_bf16_cache(name):
    net = TinyMLP(dim=16, seed=1).cuda()
    noise = torch.randn(3, 16, generator=torch.Generator().manual_seed(0)).cuda()
    c = rollout(net, noise, make_schedule("sd3", 12).sigmas, state_dtype=torch.bfloat16)
    c = type(c).from_bytes(c.to_bytes()).to("cuda")
    m = methods.build(name)
    ep = m.endpoint(c.with_plan(m.plan(12, torch.Generator().manual_seed(0))), net)
    assert ep.value.device.type == "cuda" and ep.weights.device.type == "cuda"
    if name not in ("refl", "drtune", "draft_lv"):
        assert torch.equal(ep.value.detach(), c.final)
    (ep.weights[:, None] * ep.value).sum().backward()
    assert all(p.grad is not None for p in net.parameters())
