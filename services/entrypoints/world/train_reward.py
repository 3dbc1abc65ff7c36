"""Train the attribute recogniser behind the "world_attributes" reward on rendered scenes.

    python -m services.entrypoints.world.train_reward --out /tmp/world_rec [--minutes 20] [--init ckpt]
    python -m services.entrypoints.world.publish recogniser /tmp/world_rec

The run itself is flowbp_core.world.train_reward.train_reward (its docstring says what the flags do).
"""

from __future__ import annotations

from collections.abc import Sequence

from flowbp_core.world.train_reward import RewardTrainOptions, train_reward
from services.entrypoints.options import command_line, parse_options

PROG = "python -m services.entrypoints.world.train_reward"


def main(argv: Sequence[str] | None = None) -> int:
    train_reward(parse_options(RewardTrainOptions, argv, PROG, __doc__), command_line(PROG, argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
