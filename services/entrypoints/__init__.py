"""Command-line programs: `train` (a Ray training run), `demo`, `eval`, `world/`; flowbp_core holds none."""
