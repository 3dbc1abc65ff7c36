"""Command-line programs: `train` (a Ray training run), `demo`, `eval`. The library (flowbp_core) has none."""
