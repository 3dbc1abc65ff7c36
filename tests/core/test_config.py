"""The run schema: defaults validate, overrides parse as YAML scalars, bad values name their field."""

import pytest

from flowbp_core.config import (MAX_PROMPT_CHARS, RunConfig, apply_overrides, config_from_dict, load_config,
                                parse_override)
from flowbp_core.errors import ConfigError


def test_defaults_validate_and_round_trip_through_yaml(tmp_path):
    cfg = RunConfig()
    p = tmp_path / "run.yaml"
    p.write_text(cfg.to_yaml())
    again = load_config(p, check_registries=False)
    assert again == cfg


def test_overrides_parse_yaml_scalars_and_create_sections():
    assert parse_override("--method.k=4") == (["method", "k"], 4)
    assert parse_override("train.lr=1e-5") == (["train", "lr"], 1e-5)
    assert parse_override("runtime.use_gpu=true") == (["runtime", "use_gpu"], True)
    out = apply_overrides({}, ["method.name=flowbp_bridge", "method.alpha=0.5", "train.betas=[0.8, 0.9]"])
    assert out == {"method": {"name": "flowbp_bridge", "alpha": 0.5}, "train": {"betas": [0.8, 0.9]}}


def test_method_params_are_extra_keys():
    cfg = config_from_dict({}, ["method.k=4", "method.late_bias=2.0"], check_registries=False)
    assert cfg.method.params == {"k": 4, "late_bias": 2.0}


@pytest.mark.parametrize("override, field", [
    ("train.lr=-1", "train.lr"),
    ("train.steps=0", "train.steps"),
    ("backbone.dtype=float8", "backbone.dtype"),
    ("backbone.device=tpu", "backbone.device"),
    ("runtime.mode=sometimes", "runtime.mode"),
    ("runtime.max_staleness=2", "runtime"),
    ("sampling.n_steps=0", "sampling.n_steps"),
    ("reward.placement=remote", "reward.placement"),
    ("run_id=../../etc", "run_id"),
    ("train.betas=[1.5, 0.9]", "train.betas"),
    ("unknown_section.x=1", "unknown_section"),
    ("method.k=40", "<root>"),
])
def test_bad_values_name_their_field(override, field):
    with pytest.raises(ConfigError) as e:
        config_from_dict({}, [override], check_registries=False)
    if field != "<root>":
        assert e.value.field.startswith(field)
    else:
        assert "method.k=40 exceeds sampling.n_steps=25" in str(e.value)


def test_prompt_limits():
    with pytest.raises(ConfigError, match="characters"):
        config_from_dict({"train": {"prompts": {"prompts": ["x" * (MAX_PROMPT_CHARS + 1)]}}}, check_registries=False)
    with pytest.raises(ConfigError, match="exactly one"):
        config_from_dict({"train": {"prompts": {"prompts": ["a"], "set": "hpdv2"}}}, check_registries=False)


def test_missing_and_malformed_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="existing YAML"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n- not a mapping\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)
