"""Issue 13: the baselines and samplers match the reference implementation (RuoyuWang-2077/FlowBP) and the
gradient each method is defined to take. One section per point of the issue; every expectation is closed-form."""

from __future__ import annotations

import math
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from core_helpers import LinearField
from flowbp_core import methods
from flowbp_core.config import config_from_dict
from flowbp_core.errors import ConfigError
from flowbp_core.guidance import GuidanceConfig, guided_velocity
from flowbp_core.methods.base import Plan
from flowbp_core.run import guidance_for, loss_for
from flowbp_core.methods.indices import dirichlet, evenly_spaced, sample_jk


def _within(freq: float, p: float, draws: int, z: float = 5.0) -> bool:
    return abs(freq - p) <= z * math.sqrt(max(p * (1 - p), 1e-12) / draws) + 1e-12


# ---- 1. DRTune's training steps -------------------------------------------------------------------------------
@pytest.mark.parametrize("s", range(15, 25))
def test_drtune_start_is_uniform_over_the_reference_range_for_every_early_stop(s):
    # T = s + 1, stride floor(T/3), start ~ U{0..T-1-2*stride}: s is trained iff the start takes its largest value
    total, k, draws = s + 1, 3, 4000
    stride = total // k
    max_start = total - 1 - (k - 1) * stride
    g = torch.Generator().manual_seed(s)
    starts = Counter()
    for _ in range(draws):
        idx = evenly_spaced(s, k, g)
        assert [b - a for a, b in zip(idx, idx[1:])] == [stride] * (k - 1) and idx[-1] <= s
        starts[idx[0]] += 1
    assert set(starts) <= set(range(max_start + 1))
    for start in range(max_start + 1):
        assert _within(starts[start] / draws, 1 / (max_start + 1), draws), (s, start)
    assert 0.11 <= 1 / (max_start + 1) <= 0.17  # the early-stop step itself is trained this often


def test_drtune_trains_every_step_when_k_covers_the_window():
    assert evenly_spaced(2, 3, torch.Generator().manual_seed(0)) == [0, 1, 2]


# ---- 2. chained methods differentiate the guided velocity -----------------------------------------------------
def _guided(cond: LinearField, neg: LinearField, guidance: GuidanceConfig):
    def velocity(x, sigma):
        def forward(xx, branch, _distilled):
            return (cond if branch == "cond" else neg)(xx, sigma)

        return guided_velocity(forward, x, guidance)

    return velocity


def _guided_full_chain_closed_form(cond, neg, g, cache, cot):
    """d<cot, z_N>/d theta through z_{i+1} = z_i + h_i v_g(z_i), v_g = v_neg + g (v_cond - v_neg), both linear."""
    s = cache.sigmas.tolist()
    n = cache.n_steps
    m = (neg.A + g * (cond.A - neg.A)).detach()
    zs = [cache.noise.double()]
    for i in range(n):
        v = neg(zs[-1], s[i]) + g * (cond(zs[-1], s[i]) - neg(zs[-1], s[i]))
        zs.append(zs[-1] + (s[i + 1] - s[i]) * v.detach())
    lam, cots = cot, [None] * n
    for i in reversed(range(n)):
        cots[i] = lam
        lam = lam + (s[i + 1] - s[i]) * lam @ m
    terms = [((s[i + 1] - s[i]), zs[i], s[i], cots[i]) for i in range(n)]
    want_c = cond.closed_form((g * h, x, sig, c) for h, x, sig, c in terms)
    want_n = neg.closed_form(((1 - g) * h, x, sig, c) for h, x, sig, c in terms)
    return want_c, want_n


@pytest.mark.parametrize("name", ["full_bptt", "draft_k"])
@pytest.mark.parametrize("scale", [3.0, 4.0])
def test_full_chain_under_true_cfg_is_the_gradient_of_the_guided_map(make_cache, name, scale):
    cond, neg = LinearField(seed=0), LinearField(seed=1)
    base = GuidanceConfig("true", scale, detach_negative=True)  # the backbone's setting
    m = methods.build(name, k=None) if name == "draft_k" else methods.build(name)
    guidance = m.guidance(base)
    assert guidance.detach_negative is False and guidance.scale == scale
    velocity = _guided(cond, neg, guidance)
    c = make_cache(velocity, n=8)
    cot = torch.randn(c.final.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    ep = m.endpoint(c.with_plan(m.plan(8, torch.Generator().manual_seed(0))), velocity)
    (ep.value * cot).sum().backward()
    want_c, want_n = _guided_full_chain_closed_form(cond, neg, scale, c, cot)
    for field, want in ((cond, want_c), (neg, want_n)):
        got = field.grads()
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-9)


def test_chained_methods_reject_a_detached_negative_branch():
    with pytest.raises(ConfigError, match="method.detach_negative"):
        methods.build("draft_k", detach_negative=True)


# ---- 3. a method preset may override detach_negative -----------------------------------------------------------
def _backbone(guidance: GuidanceConfig):
    return SimpleNamespace(preset=SimpleNamespace(guidance=guidance))


@pytest.mark.parametrize("method,preset,detach", [
    ("leapalign", "sd35", False), ("leapalign", "flux2", True), ("flowbp_sparse", "sd35", True),
    ("flowbp_lagrange", "sd35", True), ("alignprop", "sd35", False), ("full_bptt", None, False),
])
def test_guidance_of_the_learner_follows_the_method_preset(method, preset, detach):
    cfg = config_from_dict({"backbone": {"name": "sd3"}, "method": {"name": method, "preset": preset}},
                           check_registries=False)
    m = methods.build(method, backbone=preset)
    g = guidance_for(cfg, _backbone(GuidanceConfig("true", 3.5, True)), m)
    assert g.detach_negative is detach and g.scale == 3.5 and g.mode == "true"


def test_sd35_leapalign_sends_gradient_into_the_negative_branch(make_cache):
    cond, neg = LinearField(seed=0), LinearField(seed=1)
    for preset, reaches in (("sd35", True), ("flux2", False)):
        m = methods.build("leapalign", backbone=preset)
        velocity = _guided(cond, neg, m.guidance(GuidanceConfig("true", 3.5, True)))
        c = make_cache(velocity, n=10)
        for f in (cond, neg):
            f.zero()
        ep = m.endpoint(c.with_plan(m.plan(10, torch.Generator().manual_seed(2))), velocity)
        ep.value.sum().backward()
        assert (neg.A.grad is not None and float(neg.A.grad.abs().sum()) > 0) is reaches, preset


def test_detach_negative_is_a_checked_method_field():
    assert methods.build("flowbp_sparse", detach_negative=False).guidance(GuidanceConfig("true", 2.0)).detach_negative \
        is False
    with pytest.raises(ConfigError, match="method.detach_negative"):
        methods.build("flowbp_sparse", detach_negative="no")


# ---- 4. FLUX.2 Lagrange divides its loss by the CFG scale -------------------------------------------------------
@pytest.mark.parametrize("method,preset,scale", [
    ("flowbp_lagrange", "flux2", 0.25), ("flowbp_lagrange", "sd35", 1.0), ("flowbp_sparse", "flux2", 1.0),
    ("leapalign", "flux2", 1.0), ("flowbp_lagrange", "flux1", 1.0),
])
def test_cfg_grad_norm_compensation_comes_from_the_preset(method, preset, scale):
    backbone = {"sd35": "sd3", "flux1": "flux1", "flux2": "flux2"}[preset]
    guidance = GuidanceConfig("distilled", 4.0) if preset == "flux1" else GuidanceConfig("true", 4.0)
    m = methods.build(method, backbone=preset)
    assert m.loss_scale(guidance) == scale
    cfg = config_from_dict({"backbone": {"name": backbone}, "method": {"name": method}}, check_registries=False)
    r = torch.tensor([0.1, 0.3, 0.9])
    torch.testing.assert_close(loss_for(cfg, m, guidance)(r), scale * torch.relu(0.55 - r))


def test_cfg_grad_norm_compensation_is_an_override():
    m = methods.build("flowbp_sparse", backbone="sd35", cfg_grad_norm_compensate=True)
    assert m.loss_scale(GuidanceConfig("true", 3.5)) == 1 / 3.5
    assert m.loss_scale(GuidanceConfig("true", 1.0)) == 1.0  # no CFG amplification to undo
    assert methods.build("flowbp_lagrange", backbone="flux2", cfg_grad_norm_compensate=False).loss_scale(
        GuidanceConfig("true", 4.0)) == 1.0


# ---- 5. Dirichlet anchor rounding -------------------------------------------------------------------------------
def _reference_lengths(p: list[float], n: int) -> list[int]:
    """The rule of common/jk_sampling.py, restated: deficit to argmax(p), clamp >= 1, fix argmax(lengths)."""
    pt = torch.tensor(p, dtype=torch.float64)
    lens = (pt * n).round().long()
    lens[pt.argmax()] += n - lens.sum()
    lens = lens.clamp(min=1)
    lens[lens.argmax()] += n - lens.sum()
    return lens.tolist()


@pytest.mark.parametrize("alphas,n,max_j_rev", [((2.5, 6.0, 2.0), 25, None), ((2.5, 6.0, 2.0), 25, 10),
                                                 ((0.3, 0.3, 0.3), 12, None), ((2.5, 6.0, 2.0), 18, None)])
def test_dirichlet_anchors_round_as_the_reference(alphas, n, max_j_rev):
    for seed in range(1500):
        p = dirichlet(alphas, torch.Generator().manual_seed(seed))
        lens = _reference_lengths(p, n)
        if max_j_rev is not None and lens[0] + 1 > max_j_rev:
            cap = max(1, max_j_rev - 1)
            lens[2] += lens[0] - cap
            lens[0] = cap
        want = (n - (lens[0] + lens[1] + 1), n - (lens[0] + 1))
        got = sample_jk(n, torch.Generator().manual_seed(seed), "dirichlet", dirichlet_alphas=alphas,
                        max_j_rev=max_j_rev)
        assert got == want, (seed, p, lens)


# ---- 6. lam blends only the first leap; max_j_rev in uniform mode -----------------------------------------------
def test_lam_blends_the_first_leap_only(linear_field, make_cache):
    f = linear_field
    c = make_cache(f, n=16)
    blended = methods.build("flowbp_lagrange", lam=0.5)
    plain = methods.build("flowbp_lagrange", lam=1.0)
    plan = blended.plan(16, torch.Generator().manual_seed(3))
    assert [s.lam for s in plan.segments] == [0.5, 1.0]
    ref = plain.plan(16, torch.Generator().manual_seed(3))
    assert ref.anchors == plan.anchors
    d_blend = blended.endpoint(c.with_plan(plan), f).diagnostics
    d_plain = plain.endpoint(c.with_plan(ref), f).diagnostics
    torch.testing.assert_close(d_blend.residual_0, d_plain.residual_0)  # the j -> N leap is the same
    assert not torch.allclose(d_blend.residual_j, d_plain.residual_j)  # the k -> j leap is blended


def test_uniform_anchors_with_a_j_cap_follow_the_reference_draw():
    # j_rev ~ U{1..min(cap, N-1)}, then k_rev ~ U{j_rev+1..N}: P(j_rev=a, k_rev=b) = 1/cap * 1/(N - a)
    n, cap, draws = 8, 4, 40000
    g = torch.Generator().manual_seed(0)
    counts = Counter(sample_jk(n, g, "uniform", max_j_rev=cap) for _ in range(draws))
    for a in range(1, cap + 1):
        for b in range(a + 1, n + 1):
            p = 1 / cap / (n - a)
            assert _within(counts[(n - b, n - a)] / draws, p, draws), (a, b)
    assert sum(counts.values()) == draws and all(n - j <= cap for _, j in counts)
    plans = [methods.build("leapalign", max_j_rev=cap).plan(n, g).anchors for _ in range(200)]
    assert all(n - j <= cap for _, j in plans)
    with pytest.raises(ConfigError, match="max_j_rev"):
        sample_jk(n, g, "uniform", max_j_rev=2, min_idx=3)  # no j below the cap


# ---- 7. AlignProp: a threshold per step, latent never detached ---------------------------------------------------
@pytest.mark.parametrize("n", [10, 25, 50])
def test_alignprop_draws_a_truncation_threshold_at_every_step(n):
    m = methods.build("alignprop")
    a, b = round(0.7 * n), min(round(0.9 * n), n - 1)
    draws = 3000
    g = torch.Generator().manual_seed(n)
    counts = Counter()
    for _ in range(draws):
        plan = m.plan(n, g)
        assert plan.chain_start == plan.chain_active[0] and (n - 1) in plan.chain_active
        assert plan.jacobian_factors == len(plan.chain_active) - 1
        counts.update(plan.chain_active)
    for i in range(n):
        p = min(max((i - a + 1) / (b - a + 1), 0.0), 1.0)  # P(t_i <= i), t_i ~ U{a..b}
        assert _within(counts[i] / draws, p, draws), (i, counts[i] / draws, p)


def test_alignprop_gradient_flows_through_the_latent_of_idle_steps(linear_field, make_cache):
    f = linear_field
    c = make_cache(f, n=10)
    s, h = c.sigmas.tolist(), c.h.tolist()
    active = (3, 5, 6, 9)
    plan = Plan(method="alignprop", n_steps=10, chain_start=3, chain_active=active)
    m = methods.build("alignprop")
    cot = torch.randn(c.final.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    f.zero()
    ep = m.endpoint(c.with_plan(plan), f)
    (ep.value * cot).sum().backward()
    got = f.grads()
    # the chain: active steps re-forward on the grad-carrying latent, idle ones add their cached velocity
    zs = {3: c.state(3).double()}
    for i in range(3, 10):
        v = f(zs[i], s[i]).detach() if i in active else c.velocity(i).double()
        zs[i + 1] = zs[i] + h[i] * v
    lam, terms = cot, []
    for i in reversed(range(3, 10)):
        if i in active:
            terms.append((h[i], zs[i], s[i], lam))
            lam = lam + h[i] * lam @ f.A.detach()
    want = f.closed_form(terms)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-9)
    assert ep.diagnostics.jacobian_factors == 3 and ep.diagnostics.active == list(active)
    assert plan.needs().velocities == frozenset({4, 7, 8})


def test_alignprop_contiguous_tail_stays_available():
    m = methods.build("alignprop", truncation="tail", random_k=True)
    plan = m.plan(12, torch.Generator().manual_seed(0))
    assert plan.chain_active is None and plan.active == list(range(plan.chain_start, 12))
    with pytest.raises(ConfigError, match="method.truncation"):
        methods.build("alignprop", truncation="every")
