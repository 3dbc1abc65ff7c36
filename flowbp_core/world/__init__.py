"""The embedded world: procedural scenes, captions, the base model, the attribute reward and the judge.

Importing this package registers the "world_attributes" and "world_preference" rewards (their models load only
when they are built).
See README.md in this folder.
"""

from __future__ import annotations

from flowbp_core.rewards.base import register as _register_reward


@_register_reward("world_attributes")
def world_attributes(**kwargs):
    """Factory for `flowbp_core.rewards.build("world_attributes", checkpoint=None, aesthetic_weight=0.0)`."""
    from flowbp_core.world.reward import WorldAttributeReward

    return WorldAttributeReward(**kwargs)


@_register_reward("world_preference")
def world_preference(**kwargs):
    """Factory for `flowbp_core.rewards.build("world_preference", checkpoint=None)`: the learned preference model."""
    from flowbp_core.world.preference import WorldPreferenceReward

    return WorldPreferenceReward(**kwargs)


__all__ = ["world_attributes", "world_preference"]
