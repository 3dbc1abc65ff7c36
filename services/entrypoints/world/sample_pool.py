"""Sample the generator's own images for the recogniser and the preference model to learn from.

    python -m services.entrypoints.world.sample_pool --out /tmp/pool_base.safetensors --n 6000
    python -m services.entrypoints.world.sample_pool --out /tmp/pool_aligned.safetensors --n 6000 \
        --policy runs/demo-.../step_60            # a FlowBP checkpoint folder: its LoRA is applied first

The sampling itself is flowbp_core.world.sample_pool.sample_pool (its docstring says why and what is stored).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from flowbp_core.world.sample_pool import SamplePoolOptions, sample_pool
from services.entrypoints.options import parse_options

PROG = "python -m services.entrypoints.world.sample_pool"


def main(argv: Sequence[str] | None = None) -> int:
    print(json.dumps(sample_pool(parse_options(SamplePoolOptions, argv, PROG, __doc__))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
