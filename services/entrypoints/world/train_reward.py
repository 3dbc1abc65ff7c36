"""Train the attribute recogniser behind the "world_attributes" reward on rendered scenes.

    python -m services.entrypoints.world.train_reward --out /tmp/world_rec [--minutes 20] [--init ckpt]
    python -m services.entrypoints.world.publish recogniser /tmp/world_rec

The run itself is flowbp_core.world.train_reward.train_reward (its docstring says what the flags do).
"""

from flowbp_core.world.train_reward import RewardTrainOptions, train_reward
from services.entrypoints.options import options_command

main = options_command(RewardTrainOptions, train_reward, module="services.entrypoints.world.train_reward", doc=__doc__)

if __name__ == "__main__":
    raise SystemExit(main())
