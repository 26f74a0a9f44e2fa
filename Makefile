# Two entry points (see README): `make demo` runs the whole pipeline on the offline demo data,
# `make test` runs the test suite. Both create the virtual environment on first use and reuse it after.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export PATH := $(abspath $(BIN)):$(PATH)
export DO_NOT_TRACK := 1
export DVC_NO_ANALYTICS := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: env demo compare test lint orchestrate orchestrate-status orchestrate-stop mlflow-ui

env: $(STAMP)

# Reinstalled only when pyproject.toml changes.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# `elf lock repair` restores dvc.lock if a kill broke it during DVC's in-place write (elf/lockfile.py).
demo: $(STAMP)
	$(BIN)/elf lock repair
	$(BIN)/dvc repro
	$(BIN)/elf lock save

# ELF vs MDLM vs AR at equal training FLOPs on the demo tasks (README, "ELF vs MDLM vs AR"): the pipeline's data,
# tokenizer and encoder, then `elf compare` → compare/table.md, compare/compare.png. Not part of `make test`.
compare: $(STAMP)
	$(BIN)/elf lock repair
	$(BIN)/dvc repro encoder
	$(BIN)/elf lock save
	$(BIN)/elf compare

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check elf flows tests bench

# Prefect on this machine: a server on 127.0.0.1:4200 (or the one PREFECT_API_URL names), the elf-local
# process pool, the gpu concurrency limit, the deployments in prefect.yaml and a worker. Safe to rerun.
orchestrate: $(STAMP)
	$(BIN)/python -m flows.setup local

orchestrate-status: $(STAMP)
	$(BIN)/python -m flows.setup status

orchestrate-stop: $(STAMP)
	$(BIN)/python -m flows.setup stop

# The MLflow UI for this project's store on http://127.0.0.1:5000 (one worker).
mlflow-ui: $(STAMP)
	$(BIN)/mlflow server --backend-store-uri sqlite:///mlruns.db --host 127.0.0.1 --port 5000 --workers 1
