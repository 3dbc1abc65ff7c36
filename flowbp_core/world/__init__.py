"""The embedded world: procedural scenes, captions, the base model, the attribute reward and the judge.

Importing this package registers the "world_attributes" reward (the recogniser loads only when it is built).
See README.md in this folder.
"""

from __future__ import annotations

from flowbp_core.rewards.base import register as _register_reward


@_register_reward("world_attributes")
def world_attributes(**kwargs):
    """Factory for `flowbp_core.rewards.build("world_attributes", checkpoint=None, aesthetic_weight=0.0)`."""
    from flowbp_core.world.reward import WorldAttributeReward

    return WorldAttributeReward(**kwargs)


__all__ = ["world_attributes"]
