"""Command-line entry points: `python -m services.entrypoints.train` (a Ray training run) and the demo."""
