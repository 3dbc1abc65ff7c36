"""Every surrogate's gradient against its closed form on v = A(theta) x + b(theta) in float64."""

import pytest
import torch

from flowbp_core import methods
from flowbp_core.quadrature import leap_weights


def _loss_grads(field, endpoint, cot):
    field.A.grad = field.b.grad = field.c.grad = None
    (endpoint.value * cot).sum().backward()
    return field.grads()


def _assert_close(got, want):
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=1e-12)


def _plan_and_endpoint(name, field, cache, seed=3, **kw):
    m = methods.build(name, **kw)
    plan = m.plan(cache.n_steps, torch.Generator().manual_seed(seed))
    field.zero()
    ep = m.endpoint(cache.with_plan(plan), field)
    field.forward_calls = list(field.calls)  # before backward (checkpointing re-runs forwards there)
    return m, plan, ep


def _rescale(gamma, window_w, active_w):
    if gamma == 0:
        return 1.0
    return 1.0 + gamma * (sum(abs(x) for x in window_w) / sum(abs(x) for x in active_w) - 1.0)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("window", [0, 4])
def test_sparse_has_no_state_jacobian(linear_field, make_cache, gamma, window):
    f = linear_field
    c = make_cache(f, n=12)
    _, plan, ep = _plan_and_endpoint("flowbp_sparse", f, c, k=4, gamma=gamma, window=window, late_bias=1.0)
    cot = torch.randn(c.final.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    got = _loss_grads(f, ep, cot)
    h = c.h.tolist()
    act = plan.active
    assert len(act) == 4 and min(act) >= window
    g = _rescale(gamma, h[window:], [h[i] for i in act])
    want = f.closed_form((g * h[i], c.state(i), float(c.sigmas[i]), cot) for i in act)
    _assert_close(got, want)
    assert ep.diagnostics.jacobian_factors == 0 and not any(f.forward_calls)


@pytest.mark.parametrize("alpha,gamma", [(0.5, 0.0), (0.1, 1.0), (1.0, 0.5)])
def test_bridge_carries_exactly_one_alpha_scaled_jacobian(linear_field, make_cache, alpha, gamma):
    f = linear_field
    c = make_cache(f, n=14)
    _, plan, ep = _plan_and_endpoint("flowbp_bridge", f, c, k=5, alpha=alpha, gamma=gamma, late_bias=2.0)
    cot = torch.randn(c.final.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    got = _loss_grads(f, ep, cot)
    h = c.h.tolist()
    _, j = plan.anchors
    pre = [i for i in plan.active if i < j]
    post = [i for i in plan.active if i >= j]
    assert j in post and len(pre) >= 1 and len(pre) + len(post) == 5
    g = _rescale(gamma, h, [h[i] for i in plan.active])
    # d z~ = g sum_post h_i dv_i + (I + alpha g h_j J_j) g sum_pre h_i dv_i, J = A  =>  cot_pre = cot (I + a g h_j A)
    cot_pre = cot + alpha * g * h[j] * cot @ f.A.detach()
    terms = [(g * h[i], c.state(i), float(c.sigmas[i]), cot) for i in post]
    terms += [(g * h[i], c.state(i), float(c.sigmas[i]), cot_pre) for i in pre]
    _assert_close(got, f.closed_form(terms))
    assert ep.diagnostics.jacobian_factors == 1 == sum(f.forward_calls)


def test_leapalign_two_leaps_with_alpha_factor(linear_field, make_cache):
    f = linear_field
    c = make_cache(f, n=12)
    _, plan, ep = _plan_and_endpoint("leapalign", f, c, alpha=0.3)
    k, j = plan.anchors
    assert plan.active == [k, j]
    s = c.sigmas.tolist()
    cot = torch.randn(c.final.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    got = _loss_grads(f, ep, cot)
    # d z~ = -sigma_j dv_j + (I - alpha sigma_j J_j)(sigma_j - sigma_k) dv_k
    cot_pre = cot + 0.3 * (-s[j]) * cot @ f.A.detach()
    want = f.closed_form([(-s[j], c.state(j), s[j], cot), (s[j] - s[k], c.state(k), s[k], cot_pre)])
    _assert_close(got, want)
    assert ep.diagnostics.jacobian_factors == 1 == sum(f.forward_calls)
    # trajectory-similarity weights: 1 / (max(d_j, tau) + max(d_0, tau))
    d = ep.diagnostics
    w = 1.0 / (d.residual_j.clamp(min=0.1) + d.residual_0.clamp(min=0.1))
    torch.testing.assert_close(ep.weights, w)


@pytest.mark.parametrize("backbone,seed", [("sd35", 3), ("flux1", 5), ("flux1", 11)])
def test_lagrange_uses_its_quadrature_weights(linear_field, make_cache, backbone, seed):
    f = linear_field
    c = make_cache(f, n=25)
    m, plan, ep = _plan_and_endpoint("flowbp_lagrange", f, c, seed=seed, backbone=backbone)
    p = m.params
    k, j = plan.anchors
    s = c.sigmas.tolist()
    seg1, seg2 = plan.segments
    assert (seg1.start, seg1.end, seg2.start, seg2.end) == (k, j, j, 25)
    w1 = leap_weights("lagrange", seg1.nodes, s, k, j).tolist()
    w2 = leap_weights("lagrange", seg2.nodes, s, j, 25).tolist()

    def g_of(seg, w):
        return _rescale(p.gamma, w, [w[seg.nodes.index(m_)] for m_ in seg.active_nodes])

    g1, g2 = g_of(seg1, w1), g_of(seg2, w2)
    cot = torch.randn(c.final.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    got = _loss_grads(f, ep, cot)
    cot_pre = cot + p.alpha * w2[0] * g2 * cot @ f.A.detach()
    terms = []
    for seg, w, g, ct in ((seg2, w2, g2, cot), (seg1, w1, g1, cot_pre)):
        assert seg.active_nodes == seg.nodes[:2]  # midpoint mode: start + second support
        for node, beta in seg.active:
            assert beta == (1.0 if node == seg.start else 0.25)
            terms.append((w[seg.nodes.index(node)] * beta * g, c.state(node), s[node], ct))
    _assert_close(got, f.closed_form(terms))
    assert ep.diagnostics.jacobian_factors == 1 == sum(f.forward_calls)


def test_lagrange_without_bridge_from_generic_axes(linear_field, make_cache):
    f = linear_field
    c = make_cache(f, n=16)
    _, plan, ep = _plan_and_endpoint(
        "surrogate", f, c, anchors="kj", weights="lagrange", order=3, alpha=0.0, jk_mode="dirichlet"
    )
    assert ep.diagnostics.jacobian_factors == 0 and not any(f.forward_calls)
    s = c.sigmas.tolist()
    cot = torch.randn(c.final.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = _loss_grads(f, ep, cot)
    terms = []
    for seg in plan.segments:
        w = leap_weights("lagrange", seg.nodes, s, seg.start, seg.end).tolist()
        for node, beta in seg.active:
            terms.append((w[seg.nodes.index(node)] * beta, c.state(node), s[node], cot))
    _assert_close(got, f.closed_form(terms))


def _full_chain_grads(field, cache, cot, start=0):
    """Plain autograd through the Euler chain from `start` (no checkpointing, no pin)."""
    field.zero()
    z = cache.state(start).detach().double()
    s = cache.sigmas.tolist()
    for i in range(start, cache.n_steps):
        z = z + (s[i + 1] - s[i]) * field(z, s[i])
    (z * cot).sum().backward()
    return field.grads()


@pytest.mark.parametrize("checkpoint", [True, False])
def test_draft_k_with_k_equal_n_is_full_backprop(linear_field, make_cache, checkpoint):
    f = linear_field
    c = make_cache(f, n=10)
    cot = torch.randn(c.final.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    want = _full_chain_grads(f, c, cot)
    _, plan, ep = _plan_and_endpoint("draft_k", f, c, k=10, checkpoint=checkpoint)
    assert plan.chain_start == 0
    got = _loss_grads(f, ep, cot)
    _assert_close(got, want)
    f.zero()
    _, _, ep = _plan_and_endpoint("full_bptt", f, c, checkpoint=checkpoint)
    _assert_close(_loss_grads(f, ep, cot), want)
    assert ep.diagnostics.jacobian_factors == 9


def test_draft_2_closed_form(linear_field, make_cache):
    f = linear_field
    c = make_cache(f, n=8)
    s = c.sigmas.tolist()
    h = c.h.tolist()
    _, plan, ep = _plan_and_endpoint("draft_k", f, c, k=2)
    cot = torch.randn(c.final.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    got = _loss_grads(f, ep, cot)
    # dz_N = h_7 dv_7 + (I + h_7 J) h_6 dv_6; the chain recomputes z_7 (float64 here, cache fp32-accumulated)
    z7 = c.state(6).double() + h[6] * f(c.state(6).double(), s[6]).detach()
    want = f.closed_form([(h[7], z7, s[7], cot), (h[6], c.state(6), s[6], cot + h[7] * cot @ f.A.detach())])
    torch.testing.assert_close(got["A"], want["A"], rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(got["b"], want["b"], rtol=1e-10, atol=1e-12)
    assert ep.diagnostics.jacobian_factors == 1 == sum(f.forward_calls)


def test_refl_and_drtune_posterior_mean_closed_forms(linear_field, make_cache):
    f = linear_field
    c = make_cache(f, n=25)
    s, h = c.sigmas.tolist(), c.h.tolist()
    cot = torch.randn(c.final.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    _, plan, ep = _plan_and_endpoint("refl", f, c, seed=7)
    (g,) = plan.active
    assert g >= 25 - 11
    torch.testing.assert_close(ep.value, c.state(g).double() - s[g] * f(c.state(g), s[g]).detach())
    _assert_close(_loss_grads(f, ep, cot), f.closed_form([(-s[g], c.state(g), s[g], cot)]))

    for seed in range(4):
        _, plan, ep = _plan_and_endpoint("drtune", f, c, seed=seed)
        leap = plan.segments[-1]
        st = leap.start
        assert 25 - 10 <= st <= 24 and not leap.pin and len(plan.active) == 3
        terms = [(h[i], c.state(i), s[i], cot) for i in plan.active if i < st]
        if st in plan.active:
            terms.append((-s[st], c.state(st), s[st], cot))
        _assert_close(_loss_grads(f, ep, cot), f.closed_form(terms))
        assert not any(f.forward_calls)


def test_draft_lv_rows_and_gradient(linear_field, make_cache):
    f = linear_field
    c = make_cache(f, n=6, batch=2)
    m = methods.build("draft_lv", n=2)
    plan = m.plan(6, torch.Generator().manual_seed(0))
    f.zero()
    ep = m.endpoint(c.with_plan(plan), f)
    assert f.calls == [False, False, False]  # last step + 2 re-noised copies, all on detached inputs
    assert ep.value.shape[0] == 6 and ep.sample_index.tolist() == [0, 1, 0, 1, 0, 1]
    assert ep.diagnostics.jacobian_factors == 0
    ep2 = m.endpoint(c.with_plan(plan), f)
    torch.testing.assert_close(ep.value, ep2.value)  # replayable: same plan, same cache -> same noise
    f.zero()
    ep.value.sum().backward()
    assert f.c.grad is not None and f.c.grad.abs().sum() > 0
