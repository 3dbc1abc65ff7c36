"""Bad configuration fails at construction with ConfigError naming the field and the allowed range."""

import pytest
import torch

from flowbp_core import methods
from flowbp_core.errors import ConfigError
from flowbp_core.losses import build_loss, hinge, neg_mean, weighted_loss
from flowbp_core.sampling import rollout


@pytest.mark.parametrize(
    "name,kw,field,allowed",
    [
        ("flowbp_sparse", dict(k=30, n_steps=25), "method.k", r"\[1, N=25\]"),
        ("flowbp_sparse", dict(k=0), "method.k", r"\[1, inf\]"),
        ("draft_k", dict(k=26, n_steps=25), "method.k", r"\[1, N=25\]"),
        ("flowbp_bridge", dict(alpha=1.5), "method.alpha", r"\[0.0, 1.0\]"),
        ("flowbp_lagrange", dict(alpha=-0.1), "method.alpha", r"\[0.0, 1.0\]"),
        ("leapalign", dict(alpha=2), "method.alpha", r"\[0.0, 1.0\]"),
        ("flowbp_lagrange", dict(order=0), "method.order", r"\[1, inf\]"),
        ("flowbp_sparse", dict(gamma=1.2), "method.gamma", r"\[0.0, 1.0\]"),
        ("flowbp_lagrange", dict(tau=0.0), "method.tau", r"\(0.0, inf\)"),
        ("flowbp_lagrange", dict(tail_ratio=0.0), "method.tail_ratio", r"\(0.0, 1.0\]"),
        ("surrogate", dict(weights="simpson"), "method.weights", "euler"),
        ("surrogate", dict(anchors="jk"), "method.anchors", "kj"),
        ("flowbp_bridge", dict(k=1), "method.k", r"\[2, inf\]"),
        ("flowbp_sparse", dict(bogus=1), "method.bogus", "late_bias"),
    ],
)
def test_bad_method_config_names_field_and_range(name, kw, field, allowed):
    with pytest.raises(ConfigError) as e:
        methods.build(name, **kw)
    assert e.value.field == field
    assert field in str(e.value)
    import re

    assert re.search(allowed, str(e.value)), str(e.value)


def test_k_larger_than_n_fails_when_n_is_known():
    m = methods.build("flowbp_sparse", k=8)
    with pytest.raises(ConfigError, match=r"method.k.*N=6"):
        m.plan(6, torch.Generator().manual_seed(0))
    m = methods.build("flowbp_sparse", k=25)  # k may equal N: every step active
    plan = m.plan(25, torch.Generator().manual_seed(0))
    assert plan.active == list(range(25))


def test_unknown_method_and_backbone():
    with pytest.raises(ConfigError, match="method.name") as e:
        methods.build("draft_99")
    assert "flowbp_lagrange" in str(e.value)
    with pytest.raises(ConfigError, match="backbone"):
        methods.build("flowbp_sparse", backbone="sdxl")
    assert methods.build("flowbp_sparse", backbone="sd3").params.k == 4  # backbone-registry alias


def test_non_decreasing_schedule_is_rejected():
    with pytest.raises(ConfigError, match=r"sigmas\[2\]"):
        rollout(lambda x, s: x, torch.zeros(1, 2), torch.tensor([1.0, 0.5, 0.7, 0.0], dtype=torch.float64))


def test_presets_follow_the_reference_configs():
    s = methods.build("flowbp_sparse", backbone="flux1").params
    assert (s.k, s.late_bias, s.gamma) == (3, 2.0, 1.0)
    b = methods.build("flowbp_bridge", backbone="flux2").params
    assert (b.k, b.late_bias, b.gamma, b.alpha, b.anchors) == (3, 4.0, 0.5, 1.0, "j")
    lg = methods.build("flowbp_lagrange", backbone="flux2").params
    assert (lg.order, lg.alpha, lg.tau, lg.tail_ratio, lg.jk_mode) == (3, 0.1, 0.1, 0.7, "dirichlet")
    assert methods.build("flowbp_lagrange", backbone="sd35").params.max_j_rev == 10
    la = methods.build("leapalign").params
    assert (la.alpha, la.tau, la.order, la.jk_mode) == (0.3, 0.1, 1, "uniform")
    assert methods.build("flowbp_lagrange", backbone="flux1", alpha=0.2).params.alpha == 0.2


def test_losses():
    r = torch.tensor([0.2, 0.6, 0.55])
    assert torch.allclose(hinge(r), torch.tensor([0.35, 0.0, 0.0]))
    assert torch.equal(neg_mean(r), -r)
    w = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    per = torch.tensor([1.0, 1.0, 2.0], requires_grad=True)
    loss = weighted_loss(per, w)
    loss.backward()
    assert torch.isclose(loss, torch.tensor(3.0)) and w.grad is None
    assert torch.allclose(build_loss("hinge", clip=0.3)(r), torch.tensor([0.1, 0.0, 0.0]))
    with pytest.raises(ConfigError, match="reward.loss"):
        build_loss("mse")
    with pytest.raises(ValueError, match="weights shape"):
        weighted_loss(per, torch.ones(2))


HOSTILE_PARAMS = [float("nan"), float("inf"), float("-inf"), "nan", "3", True, 10**30]


def _number_params(params_cls) -> list[str]:
    """Names of a method's int and float parameters (Optional ones too), read from its dataclass."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(params_cls)
    names = []
    for f in dataclasses.fields(params_cls):
        kinds = {a for a in typing.get_args(hints[f.name]) if a is not type(None)} or {hints[f.name]}
        if kinds <= {int, float}:
            names.append(f.name)
    return names


@pytest.mark.parametrize("name", methods.names())
def test_every_number_parameter_of_every_method_rejects_hostile_values(name):
    """Walks each registered method's parameter dataclass: NaN, +-inf, strings, true and a huge integer are a
    ConfigError that names the parameter, whichever layer refuses them (the run schema or the method)."""
    from flowbp_core.config import config_from_dict

    keys = _number_params(type(methods.build(name).params))
    assert keys, name
    for key in keys:
        for value in HOSTILE_PARAMS:
            with pytest.raises(ConfigError) as e:
                config_from_dict({"method": {"name": name, key: value}})
            assert key in str(e.value), (name, key, value, str(e.value))
