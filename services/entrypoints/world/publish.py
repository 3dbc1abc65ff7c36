"""Copy a finished training run into the committed assets, re-hashed, with its provenance.

    python -m services.entrypoints.world.publish base <train_out_dir> [--weights ema|raw] [--note "trained on ..."]
    python -m services.entrypoints.world.publish recogniser <train_out_dir>
    python -m services.entrypoints.world.publish preference <train_out_dir>

`--weights raw` publishes the raw weights of the base model's train_state.pt instead of its EMA (see
flowbp_core.world.publish).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from flowbp_core.world.publish import PUBLISHABLE, publish


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m services.entrypoints.world.publish", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=PUBLISHABLE)
    p.add_argument("src", type=Path)
    p.add_argument("--weights", choices=("ema", "raw"), default="ema")
    p.add_argument("--dst", type=Path, default=None, help="target folder (default: the committed assets)")
    p.add_argument("--note", default="", help="provenance kept in the metadata (e.g. the machine it trained on)")
    a = p.parse_args(argv)
    dst, digest = publish(a.what, a.src, weights=a.weights, dst=a.dst, note=a.note)
    print(f"published {a.what} to {dst} (sha256 {digest})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
