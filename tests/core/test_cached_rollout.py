import math

import torch

from flowbp_core.sampling import euler_add, rollout
from flowbp_core.schedules import make_schedule


def test_rollout_matches_hand_euler_and_stores_in_state_dtype():
    n = 8
    sig = make_schedule("sd3", n).sigmas
    a = -0.7
    noise = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0))
    seen = []
    c = rollout(lambda x, s: a * x + s, noise, sig, state_dtype=torch.bfloat16, progress=lambda i, n: seen.append(i))
    assert seen == list(range(n))
    assert c.final.dtype == torch.float32 and c.noise.dtype == torch.bfloat16
    assert all(t.dtype == torch.bfloat16 for t in list(c.states.values()) + list(c.velocities.values()))
    assert sorted(c.states) == list(range(1, n)) and sorted(c.velocities) == list(range(n))
    # the model is fed the stored state; the sum is carried in fp32 with the stored velocity
    z = noise.bfloat16().float()
    for i in range(n):
        x = z.bfloat16() if i else noise.bfloat16()
        if i:
            assert torch.equal(c.states[i], x)
        v = (a * x + float(sig[i])).bfloat16()
        assert torch.equal(c.velocities[i], v)
        z = z + float(sig[i + 1] - sig[i]) * v.float()
    assert torch.equal(c.final, z)


def test_readding_cached_velocities_reproduces_final_bitwise():
    sig = make_schedule("flux1", 13).sigmas
    noise = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))
    c = rollout(lambda x, s: torch.sin(x) * s - x, noise, sig, state_dtype=torch.bfloat16)
    z = c.noise.float()
    for i in range(c.n_steps):
        z = euler_add(z, float(c.h[i]), c.velocity(i))
    assert torch.equal(z, c.final)


def test_rollout_converges_to_the_ode_solution():
    # dz/dsigma = a z  =>  z(0) = z(1) * exp(-a); Euler error is O(1/N)
    a = 0.8
    noise = torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    exact = noise * math.exp(-a)
    errs = []
    for n in (10, 40):
        c = rollout(lambda x, s: a * x, noise, make_schedule("linear", n).sigmas)
        errs.append(float((c.final.double() - exact).abs().max()))
    assert errs[1] < errs[0] / 3


def test_rollout_runs_without_grad():
    w = torch.nn.Parameter(torch.tensor(0.5))
    c = rollout(lambda x, s: w * x, torch.randn(2, 3), make_schedule("sd3", 4).sigmas)
    assert not c.final.requires_grad and not any(v.requires_grad for v in c.velocities.values())
