"""The FlowBP job controller: REST API (FastAPI), Redis job store, Ray job submission, auth, metrics, CLI.

See README.md in this folder. Entry points: `python -m services.controller.app` (the service),
`flowbp` (the CLI, services.controller.cli:main), `make serve` (services.controller.serve_local).
"""
