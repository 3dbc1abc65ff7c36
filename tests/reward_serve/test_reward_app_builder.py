"""The standing reward service's Serve application builder validates its YAML args before loading anything."""

import pytest

from flowbp_core.errors import ConfigError
from services.reward_serve.app import build_app, spec_from_args


def test_default_args_build_a_value_and_grad_app():
    parsed, spec = spec_from_args({})
    assert spec.panel == (("world_attributes", 1.0),) and not parsed.score_only
    app = build_app({"rewards": [{"name": "saturation"}, {"name": "contrast", "weight": 0.5}], "score_only": True})
    assert type(app).__name__ == "Application"


@pytest.mark.parametrize("args, field", [
    ({"max_batch_size": 0}, "rewardService.args.max_batch_size"),
    ({"rewards": []}, "rewardService.args.rewards"),
    ({"replicas": 2}, "rewardService.args.replicas"),
])
def test_bad_args_name_the_field(args, field):
    with pytest.raises(ConfigError) as e:
        build_app(args)
    assert e.value.field == field
