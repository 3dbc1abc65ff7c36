"""Sample the generator's own images for the recogniser and the preference model to learn from.

    python -m services.entrypoints.world.sample_pool --out /tmp/pool_base.safetensors --n 6000
    python -m services.entrypoints.world.sample_pool --out /tmp/pool_aligned.safetensors --n 6000 \
        --policy runs/demo-.../step_60            # a FlowBP checkpoint folder: its LoRA is applied first

The sampling itself is flowbp_core.world.sample_pool.sample_pool (its docstring says why and what is stored).
"""

from flowbp_core.backbones.embedded import load_policy
from flowbp_core.world.sample_pool import SamplePoolOptions, sample_pool
from services.entrypoints.options import options_command


def run(options: SamplePoolOptions) -> dict:
    return sample_pool(options, load_policy(options.policy))


main = options_command(SamplePoolOptions, run, module="services.entrypoints.world.sample_pool", doc=__doc__,
                       provenance=False, report=True)

if __name__ == "__main__":
    raise SystemExit(main())
