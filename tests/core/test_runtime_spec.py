"""`runtime` lives in its own module (`flowbp_core.runtime_spec`), re-exported by `flowbp_core.config`; its new
fields are refused outside their range with the field, the value and the range named."""

from __future__ import annotations

import pytest

from flowbp_core import config, runtime_spec
from flowbp_core.errors import ConfigError


def test_runtime_spec_is_re_exported_and_defaults_to_one_batch():
    assert config.RuntimeSpec is runtime_spec.RuntimeSpec
    assert config.RunConfig().runtime.rollout_batch is None
    assert config.config_from_dict({"runtime": {"rollout_batch": 8}}).runtime.rollout_batch == 8


@pytest.mark.parametrize(("value", "allowed"), [(0, "greater than or equal to 1"),
                                                (4097, "less than or equal to 4096"),
                                                (2.5, "a valid integer"), ("4", "a valid integer")])
def test_rollout_batch_out_of_range_names_field_value_and_range(value, allowed):
    with pytest.raises(ConfigError) as e:
        config.config_from_dict({"runtime": {"rollout_batch": value}})
    assert str(e.value) == f"runtime.rollout_batch={value!r} is not allowed: expected {allowed}"


def test_weight_sync_names_its_backends():
    assert config.config_from_dict({"runtime": {"weight_sync": "collective"}}).runtime.weight_sync == "collective"
    with pytest.raises(ConfigError, match="runtime.weight_sync='nccl' is not allowed: expected 'auto', "
                                          "'lora_delta', 'full_state' or 'collective'"):
        config.config_from_dict({"runtime": {"weight_sync": "nccl"}})
