"""Registry and Panel: unknown names, lazy built-ins, plugin registration, weighted sums."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from flowbp_core.errors import ConfigError
from flowbp_core.rewards import Panel, Reward, build, build_panel, names, register


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ConfigError) as e:
        build("hps_v9")
    msg = str(e.value)
    assert "hps_v9" in msg
    for known in ("hpsv2", "pickscore", "clipscore", "aesthetic", "imagereward", "saturation", "efficientnet"):
        assert known in msg


def test_importing_the_registry_loads_no_model_library():
    # Built-ins are imported when built, so importing the seam (as the world package and the services do) stays
    # cheap; names() lists them without importing them.
    code = ("import sys, flowbp_core.rewards as r; "
            "assert 'transformers' not in sys.modules, 'transformers imported'; "
            "n = r.names(); assert 'hpsv2' in n and 'world_attributes' in n, n; "
            "assert 'flowbp_core.rewards.hpsv2' not in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout


def test_register_decorator_adds_a_reward():
    @register("test_brightness")
    class Brightness:
        name = "test_brightness"

        def __init__(self, gain: float = 1.0):
            self.gain = gain

        def __call__(self, images, prompts):
            return self.gain * images.mean(dim=(1, 2, 3))

    assert "test_brightness" in names()
    r = build("test_brightness", gain=2.0)
    assert isinstance(r, Reward)
    assert torch.allclose(r(torch.full((2, 3, 4, 4), 0.25), ["a", "b"]), torch.tensor([0.5, 0.5]))


def test_panel_is_a_weighted_sum_and_a_reward():
    panel = build_panel({"saturation": 2.0, "contrast": -0.5})
    assert isinstance(panel, Reward)
    x = torch.rand(3, 3, 16, 16, requires_grad=True)
    parts = panel.components(x, ["p"] * 3)
    total = panel(x, ["p"] * 3)
    torch.testing.assert_close(total, 2.0 * parts["saturation"] - 0.5 * parts["contrast"])
    total.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_panel_rejects_bad_members():
    sat = build("saturation")
    with pytest.raises(ConfigError, match="at least one"):
        Panel([])
    with pytest.raises(ConfigError, match="distinct"):
        Panel([(sat, 1.0), (build("saturation"), 1.0)])
    with pytest.raises(ConfigError, match="finite"):
        Panel([(sat, float("nan"))])
