"""One method-preset mapping: the backbone family's `PRESET` is the truth, and the methods registry and
`RunConfig.method_preset()` read it; a run's `sampling.n_steps` wins over the family's preset `n_steps`."""

from __future__ import annotations

import importlib

import pytest

from flowbp_core import backbones, methods
from flowbp_core.config import config_from_dict
from flowbp_core.methods.registry import resolve_backbone


@pytest.mark.parametrize("name", backbones.names())
def test_registry_config_and_backbone_agree_on_the_method_preset(name):
    truth = importlib.import_module(backbones.get(name).__module__).PRESET.method_preset
    cfg = config_from_dict({"backbone": {"name": name}}, check_registries=False)
    assert resolve_backbone(name) == cfg.method_preset() == truth
    for m in methods.names():
        assert methods.build(m, backbone=name).params == methods.build(m, backbone=truth).params


def test_method_preset_set_in_the_run_wins():
    cfg = config_from_dict({"backbone": {"name": "embedded"}, "method": {"preset": "flux2"}}, check_registries=False)
    assert cfg.method_preset() == "flux2"


def test_run_n_steps_wins_over_the_backbone_preset():
    from flowbp_core.run import build_components

    base = {"backbone": {"name": "sd3", "tiny": True, "device": "cpu", "lora": {"rank": 4}},
            "method": {"name": "flowbp_sparse", "k": 2},
            "train": {"prompts": {"prompts": ["a red circle"]}}}
    comp = build_components(config_from_dict(base, ["sampling.n_steps=6"]), with_reward=False)
    assert comp.n_steps == 6 != comp.backbone.preset.n_steps
    # sampling.n_steps always has a value: 25 unless set, whatever the family's preset says (embedded's is 20)
    assert config_from_dict({"backbone": {"name": "embedded"}}, check_registries=False).sampling.n_steps == 25
