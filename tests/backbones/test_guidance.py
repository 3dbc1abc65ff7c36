"""The one function that combines guidance branches: values and, above all, where the gradient goes."""

from __future__ import annotations

import pytest
import torch

from flowbp_core.errors import ConfigError
from flowbp_core.guidance import GuidanceConfig, guided_velocity


class LinearBranches:
    """v_cond = a * x, v_neg = b * x, with a and b trainable; records the calls it gets."""

    def __init__(self):
        self.a = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
        self.b = torch.tensor(-0.5, dtype=torch.float64, requires_grad=True)
        self.calls: list[tuple[str, float | None, bool]] = []

    def __call__(self, x, branch, distilled_scale):
        self.calls.append((branch, distilled_scale, torch.is_grad_enabled()))
        w = self.a if branch == "cond" else self.b
        out = w * x
        return out if distilled_scale is None else out * distilled_scale


def test_true_cfg_value_and_detached_negative_gradient():
    f = LinearBranches()
    x = torch.tensor([1.5, -1.0], dtype=torch.float64, requires_grad=True)
    g = GuidanceConfig("true", 3.5, detach_negative=True)
    v = guided_velocity(f, x, g)
    assert torch.allclose(v, -0.5 * x + 3.5 * (2.0 * x + 0.5 * x))
    v.sum().backward()
    # d v / d a = g * x; the negative branch keeps no graph: no gradient to b, and x only through v_cond
    assert torch.allclose(f.a.grad, 3.5 * x.detach().sum())
    assert f.b.grad is None
    assert torch.allclose(x.grad, torch.full_like(x, 3.5 * 2.0))
    assert [c[0] for c in f.calls] == ["cond", "neg"] and f.calls[1][2] is False


def test_true_cfg_without_detach_differentiates_both_branches():
    f = LinearBranches()
    x = torch.tensor([1.5, -1.0], dtype=torch.float64, requires_grad=True)
    guided_velocity(f, x, GuidanceConfig("true", 3.5, detach_negative=False)).sum().backward()
    assert torch.allclose(f.b.grad, (1 - 3.5) * x.detach().sum())
    assert torch.allclose(x.grad, torch.full_like(x, -0.5 + 3.5 * 2.5))


def test_distilled_passes_scale_once_and_none_uses_cond_only():
    f = LinearBranches()
    x = torch.ones(2, dtype=torch.float64)
    v = guided_velocity(f, x, GuidanceConfig("distilled", 4.0))
    assert f.calls == [("cond", 4.0, True)] and torch.allclose(v, 8.0 * x)
    f.calls.clear()
    assert torch.allclose(guided_velocity(f, x, GuidanceConfig("none", 7.0)), 2.0 * x)
    assert f.calls == [("cond", None, True)]


def test_scale_one_skips_the_negative_forward():
    f = LinearBranches()
    x = torch.ones(2, dtype=torch.float64)
    assert torch.allclose(guided_velocity(f, x, GuidanceConfig("true", 1.0)), 2.0 * x)
    assert [c[0] for c in f.calls] == ["cond"]


@pytest.mark.parametrize("kw,field", [(dict(mode="cfg"), "guidance.mode"),
                                      (dict(mode="true", scale=0.0), "guidance.scale"),
                                      (dict(mode="distilled", scale=-1.0), "guidance.scale")])
def test_bad_guidance_config_names_the_field(kw, field):
    with pytest.raises(ConfigError, match=field):
        GuidanceConfig(**kw)


def test_doubled_batch_forward_is_used_only_without_a_graph():
    f = LinearBranches()
    pair_calls = []

    def pair(x):
        pair_calls.append(torch.is_grad_enabled())
        return f.a * x, f.b * x

    x = torch.tensor([1.0, 2.0], dtype=torch.float64)
    g = GuidanceConfig("true", 3.0)
    with torch.no_grad():
        v = guided_velocity(f, x, g, pair)
    assert pair_calls == [False] and f.calls == []
    assert torch.allclose(v, -0.5 * x + 3.0 * 2.5 * x)
    guided_velocity(f, x, g, pair).sum().backward()
    assert pair_calls == [False] and [c[0] for c in f.calls] == ["cond", "neg"]
    assert f.b.grad is None
