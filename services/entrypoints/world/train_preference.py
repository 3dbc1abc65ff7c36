"""Train the world's preference model from pairwise choices labelled by the rater (Bradley-Terry loss).

    python -m services.entrypoints.world.sample_pool --out /tmp/pools/base4.safetensors --n 512 --per-prompt 4
    python -m services.entrypoints.world.train_preference --out /tmp/world_pref --pool /tmp/pools/base4.safetensors
    python -m services.entrypoints.world.publish preference /tmp/world_pref

The run itself is flowbp_core.world.train_preference.train_preference (its docstring says what a step shows).
"""

from flowbp_core.world.train_preference import PreferenceTrainOptions, train_preference
from services.entrypoints.options import options_command

main = options_command(PreferenceTrainOptions, train_preference, module="services.entrypoints.world.train_preference",
                       doc=__doc__)

if __name__ == "__main__":
    raise SystemExit(main())
