"""Train the embedded base model with the rectified-flow loss, by wall-clock budget.

    python -m services.entrypoints.world.train_base --out /tmp/world_base [--minutes 30] [--resume]  # 2 cores
    python -m services.entrypoints.world.train_base --out /tmp/world_base --device cuda --workers 6 --batch 1024 \
        --lr 1.5e-3 --ema 0.999 --minutes 4 --ckpt-minutes 100          # the committed base (one H100)
    python -m services.entrypoints.world.publish base /tmp/world_base      # into the committed assets

The run itself is flowbp_core.world.train_base.train_base (its docstring says what a step does).
"""

from flowbp_core.world.train_base import BaseTrainOptions, train_base
from services.entrypoints.options import options_command

main = options_command(BaseTrainOptions, train_base, module="services.entrypoints.world.train_base", doc=__doc__)

if __name__ == "__main__":
    raise SystemExit(main())
