# FlowBP: `make demo` and `make test` work on a fresh machine (they set up first).
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
QUICK ?=
REWARD ?=
PYTEST_ARGS ?=

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_USAGE_STATS_ENABLED := 0
export RAY_AUTH_MODE := disabled
export TOKENIZERS_PARALLELISM := false

.PHONY: setup system-deps test test-fast demo serve manifests bench bench-gpu eval clean

# The venv is rebuilt only when the pins or the project metadata change.
$(STAMP): requirements.txt pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.txt
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -e .
	@touch $(STAMP)

# Redis (controller store), promtool (alert rules) and prometheus (the live dashboard test) come from Debian;
# installed only when missing.
system-deps:
	@command -v redis-server >/dev/null || (apt-get update -qq && apt-get install -y -qq redis-server >/dev/null)
	@(command -v promtool && command -v prometheus) >/dev/null || \
		(apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus >/dev/null)

setup: $(STAMP) system-deps

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -m "not integration and not slow" $(PYTEST_ARGS)

# OpenMP threads sleep at barriers instead of spinning: beside any other busy process, spinning threads of the
# demo's two roles slowed its steps from 3 s to 30-60 s on 2 cores (flowbp_core/world/README.md, Gotchas).
demo: setup
	OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE} $(BIN)/python -m services.entrypoints.demo $(if $(QUICK),--quick,) $(if $(REWARD),--reward $(REWARD),)

serve: setup
	$(BIN)/python -m services.controller.serve_local

manifests: setup
	$(BIN)/python -m k8s.render

bench: setup
	$(BIN)/python benchmarks/gradient_paths.py

clean:
	rm -rf $(VENV) .pytest_cache runs

bench-gpu: setup
	$(BIN)/python benchmarks/gpu_step.py

eval: setup
	$(BIN)/python -m services.entrypoints.eval --backbone embedded --prompts world_heldout --rewards world_attributes --out runs/eval
