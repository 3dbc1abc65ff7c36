"""Differentiable reward models behind one seam: `build(name, **kw) -> Reward`, `names()`, `register(name)`.

Importing this package loads no model (built-ins are imported when built). See README.md.
"""

from flowbp_core.rewards.base import (FrozenReward, Panel, Reward, build, build_panel, names, register,
                                      require_dir, require_file)

__all__ = ["FrozenReward", "Panel", "Reward", "build", "build_panel", "names", "register", "require_dir",
           "require_file"]
