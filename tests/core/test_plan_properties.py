"""Plan invariants for every method, over random N, presets and seeds (plans are cheap: no model runs)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flowbp_core import methods

SURROGATES = {"flowbp_sparse", "flowbp_bridge", "flowbp_lagrange", "leapalign", "surrogate", "refl", "drtune",
              "draft_lv"}


@settings(max_examples=150, deadline=None)
@given(
    name=st.sampled_from(sorted(methods.names())),
    backbone=st.sampled_from([None, "sd35", "flux1", "flux2"]),
    n=st.integers(min_value=6, max_value=60),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
)
def test_plans_are_well_formed(name, backbone, n, seed):
    m = methods.build(name, backbone=backbone)
    plan = m.plan(n, torch.Generator().manual_seed(seed))
    assert plan.n_steps == n and plan.method == name
    act = plan.active
    assert act == sorted(set(act)) and all(0 <= i < n for i in act) and act
    if name in SURROGATES:
        segs = plan.segments
        assert segs[-1].end == n
        for a, b in zip(segs, segs[1:]):
            assert a.end == b.start  # contiguous
        for s in segs:
            assert 0 <= s.start < s.end <= n and s.nodes[0] == s.start and set(s.active_nodes) <= set(s.nodes)
        assert plan.jacobian_factors <= 1
        if plan.anchors is not None:
            k, j = plan.anchors
            assert 0 <= k < j < n and j in act
        if name == "flowbp_sparse":
            assert len(act) == m.params.k
        if name == "flowbp_bridge":
            assert len(act) == min(m.params.k, n) and plan.jacobian_factors == 1
        if name == "flowbp_lagrange":
            assert len(act) <= 4
    else:
        assert plan.jacobian_factors == len(act) - 1
    needs = m.needs(plan, n)
    assert all(0 < i < n for i in needs.states) and all(0 <= i < n for i in needs.velocities)
    # same seed, same plan
    assert m.plan(n, torch.Generator().manual_seed(seed)) == plan
