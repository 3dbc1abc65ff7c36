"""Samplers reproduce their distributions and are rank-identical; Lagrange weights are exact quadrature."""

import math
from collections import Counter

import numpy as np
import pytest
import torch

from flowbp_core.errors import ConfigError
from flowbp_core.quadrature import leap_weights, lagrange_weights, select_active_supports, support_indices
from flowbp_core.methods.indices import (
    dirichlet,
    evenly_spaced,
    late_biased,
    sample_jk,
    split_budget,
    tail_start,
)
from flowbp_core.schedules import make_schedule


def test_late_biased_single_draw_follows_power_law():
    g = torch.Generator().manual_seed(0)
    draws = 20000
    counts = Counter(late_biased(range(10), 1, 2.0, g)[0] for _ in range(draws))
    p = np.array([(i + 1) ** 2.0 for i in range(10)])
    p /= p.sum()
    for i in range(10):
        se = math.sqrt(p[i] * (1 - p[i]) / draws)
        assert abs(counts[i] / draws - p[i]) < 5 * se, (i, counts[i] / draws, p[i])


def test_late_biased_without_replacement_inclusion_matches_exact_enumeration():
    # K = 2 from 4 items: P(i in A) = sum over ordered pairs, computed exactly
    w = np.array([(i + 1) ** 1.5 for i in range(4)])
    exact = np.zeros(4)
    for a in range(4):
        for b in range(4):
            if a != b:
                pr = w[a] / w.sum() * w[b] / (w.sum() - w[a])
                exact[a] += pr
                exact[b] += pr
    g = torch.Generator().manual_seed(1)
    draws = 20000
    counts = Counter(i for _ in range(draws) for i in late_biased(range(4), 2, 1.5, g))
    for i in range(4):
        assert abs(counts[i] / draws - exact[i]) < 0.015
    s = late_biased(range(5, 15), 4, 1.0, g, relative=True)
    assert s == sorted(s) and len(set(s)) == 4 and all(5 <= i < 15 for i in s)


def test_uniform_anchors_cover_all_pairs_evenly():
    g = torch.Generator().manual_seed(2)
    n, draws = 6, 30000
    counts = Counter(sample_jk(n, g, "uniform") for _ in range(draws))
    assert len(counts) == n * (n - 1) // 2
    for (k, j), c in counts.items():
        assert 0 <= k < j < n
        assert abs(c / draws - 1 / 15) < 0.01


def test_dirichlet_sampler_moments():
    g = torch.Generator().manual_seed(3)
    a = np.array([2.5, 6.0, 2.0])
    x = np.array([dirichlet(a, g) for _ in range(6000)])
    mean = a / a.sum()
    var = mean * (1 - mean) / (a.sum() + 1)
    assert np.allclose(x.mean(0), mean, atol=0.01)
    assert np.allclose(x.var(0), var, rtol=0.12)
    small = np.array([dirichlet([0.5, 0.5], g) for _ in range(6000)])  # shape < 1 path
    assert abs(small[:, 0].mean() - 0.5) < 0.02 and abs(small[:, 0].var() - 0.125) < 0.01


def test_dirichlet_anchors_place_k_and_j_like_the_reference():
    g = torch.Generator().manual_seed(4)
    kj = np.array([sample_jk(25, g, "dirichlet") for _ in range(3000)])
    assert (kj[:, 0] < kj[:, 1]).all() and kj.min() >= 0 and kj.max() < 25
    assert abs(kj[:, 0].mean() - 4) < 1.0 and abs(kj[:, 1].mean() - 18) < 1.0  # algorithms.md 2.7
    capped = np.array([sample_jk(25, g, "dirichlet", max_j_rev=10) for _ in range(2000)])
    assert (25 - capped[:, 1] <= 10).all()


def test_tail_ratio_restricts_anchors_to_the_final_steps():
    assert tail_start(25, 0.7) == 7 and tail_start(25, 1.0) == 0
    g = torch.Generator().manual_seed(5)
    for mode in ("uniform", "dirichlet"):
        kj = [sample_jk(25, g, mode, tail_ratio=0.7) for _ in range(500)]
        assert min(k for k, _ in kj) >= 7


def test_samplers_are_identical_across_ranks_and_ignore_global_rng():
    def draw(rank):
        torch.manual_seed(rank)  # a different global RNG state per rank
        g = torch.Generator().manual_seed(114)
        return (
            [late_biased(range(25), 4, 1.0, g) for _ in range(5)],
            [sample_jk(25, g, "dirichlet") for _ in range(5)],
            [sample_jk(25, g, "uniform") for _ in range(5)],
            [evenly_spaced(20, 3, g) for _ in range(5)],
        )

    assert draw(0) == draw(1) == draw(7)


def test_split_budget_and_evenly_spaced():
    assert split_budget(5, 18, 7) == (4, 1)
    assert split_budget(5, 1, 24) == (1, 4)
    assert split_budget(3, 2, 1) == (2, 1)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        t = evenly_spaced(17, 3, g)
        assert t[1] - t[0] == t[2] - t[1] == 6 and 0 <= t[0] < 6
    with pytest.raises(ConfigError, match="method|k"):
        split_budget(1, 3, 3)


# ---- quadrature ---------------------------------------------------------------------------------------------
SIG = make_schedule("sd3", 25).sigmas.tolist()


@pytest.mark.parametrize("s,e", [(0, 25), (4, 18), (18, 25), (3, 5), (24, 25)])
@pytest.mark.parametrize("p", [1, 2, 3, 4])
def test_lagrange_weights_sum_to_interval_and_are_exact_for_low_degree(s, e, p):
    nodes = support_indices(s, e, p)
    assert nodes[0] == s and e not in nodes and len(nodes) == min(p, e - s)
    w = leap_weights("lagrange", nodes, SIG, s, e)
    assert w.dtype == np.float64
    assert math.isclose(w.sum(), SIG[e] - SIG[s], rel_tol=1e-12, abs_tol=1e-15)
    rng = np.random.default_rng(p)
    for deg in range(len(nodes)):
        coef = rng.normal(size=deg + 1)
        v = np.polynomial.Polynomial(coef)
        exact = v.integ()(SIG[e]) - v.integ()(SIG[s])
        approx = sum(wm * v(SIG[m]) for wm, m in zip(w, nodes))
        assert math.isclose(approx, exact, rel_tol=1e-10, abs_tol=1e-13)


def test_order_one_is_the_euler_leap():
    for s, e in [(0, 25), (7, 12), (24, 25)]:
        w = leap_weights("lagrange", support_indices(s, e, 1), SIG, s, e)
        assert w.tolist() == [SIG[e] - SIG[s]]
    # and a single-step Euler segment equals the order-1 leap over it
    assert leap_weights("euler", [6], SIG, 6, 7).tolist() == leap_weights("lagrange", [6], SIG, 6, 7).tolist()


def test_worked_example_from_algorithms_md():
    assert support_indices(4, 18, 3) == [4, 10, 17]
    w = leap_weights("lagrange", [4, 10, 17], SIG, 4, 18)
    assert np.allclose(w, [-0.012, -0.247, -0.142], atol=6e-4)
    assert support_indices(18, 25, 3) == [18, 21, 24]
    assert np.allclose(leap_weights("lagrange", [18, 21, 24], SIG, 18, 25), [-0.067, -0.225, -0.247], atol=6e-4)


def test_quadrature_helpers_reject_bad_input():
    with pytest.raises(ConfigError, match="order"):
        support_indices(0, 5, 0)
    with pytest.raises(ValueError, match="distinct"):
        lagrange_weights([0.5, 0.5], 1.0, 0.0)
    with pytest.raises(ValueError, match="every step"):
        leap_weights("euler", [0, 2], SIG, 0, 3)
    assert select_active_supports([4, 10, 17], "midpoint", 2) == [4, 10]
    assert select_active_supports([4, 10, 17], "all", 2) == [4, 10]
    assert select_active_supports([4, 10, 17], "start", 2) == [4]
    with pytest.raises(ConfigError, match="support_mode"):
        select_active_supports([4], "every", 2)
