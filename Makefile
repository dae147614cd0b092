# medattn — two commands on a fresh machine:
#   make demo   synthetic NIH-layout dataset -> prepare -> AG-CNN G/L/F (torchrun, 2 procs, DALI) -> eval -> report
#   make test   the test suite
# Both create .venv when it is missing and install what they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch and torchvision must come as a matching pair. On a CPU-only machine the registry's
# torchvision needs the CUDA build of torch (it runs on a CPU too); "===" asks for exactly
# that release, not a local "+cpu" wheel. Override on clusters: make TORCH_SPEC="torch==X ..."
TORCH_SPEC ?= torch===2.13.0 torchvision==0.28.0
EXTRAS ?= all,dev
STAMP := $(VENV)/.medattn-installed
DEMO ?= demo-out
DEMO_IMAGES ?= 1600
NPROC ?= 2
PYTEST_ARGS ?=

.PHONY: help venv test demo clean-demo system-deps slurm-up slurm-down bench-gpu

help:
	@echo "make demo         run the whole AG-CNN pipeline on a synthetic dataset (CPU, ~10 min)"
	@echo "make test         run the test suite (creates .venv on first use)"
	@echo "make system-deps  apt-get SLURM, munge and chromium (root) for the cluster/browser tests"
	@echo "make slurm-up     start the local two-node SLURM cluster (scripts/slurm-local.sh)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel

# Re-install when the package metadata changes.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install $(TORCH_SPEC)
	$(BIN)/python -m pip install -e ".[$(EXTRAS)]"
	@touch $@

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest tests $(PYTEST_ARGS)

demo: $(STAMP)
	@set -euo pipefail; \
	export PATH="$(CURDIR)/$(BIN):$$PATH"; \
	echo "== 1/5 synthetic ChestX-ray14 (NIH layout) -> $(DEMO)/nih"; \
	medattn synth --out $(DEMO)/nih --images $(DEMO_IMAGES) --size 1024 --seed 0; \
	echo "== 2/5 check it"; \
	medattn inspect --nih-root $(DEMO)/nih; \
	echo "== 3/5 prepare pixel shards -> $(DEMO)/prep"; \
	medattn prepare --nih-root $(DEMO)/nih --out $(DEMO)/prep --size 256 --split official; \
	echo "== 4/5 train AG-CNN global -> local -> fusion with torchrun ($(NPROC) processes)"; \
	torchrun --standalone --nproc-per-node $(NPROC) -m medattn train --config demo --data $(DEMO)/prep --out $(DEMO)/run; \
	echo "== 5/5 evaluate on the test split and write the report"; \
	medattn eval --run $(DEMO)/run --split test; \
	medattn report --run $(DEMO)/run

clean-demo:
	rm -rf $(DEMO)

# System packages for the SLURM and browser tests (Debian, as root). CI runs this first.
system-deps:
	@if command -v slurmctld >/dev/null && command -v munged >/dev/null && command -v chromium >/dev/null; then \
	  echo "system deps present"; \
	else \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge chromium >/dev/null; \
	fi

slurm-up:
	scripts/slurm-local.sh start

slurm-down:
	scripts/slurm-local.sh stop

# The GPU check (on the GPU machine: no network, nothing installed): docs/benchmarks.md
bench-gpu:
	scripts/gpu-check.sh --out bench-out/gpu-check $(if $(wildcard .dali-parts/MANIFEST.json),--dali-parts .dali-parts)
