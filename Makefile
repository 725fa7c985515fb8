# Two commands on a fresh machine: `make run` (the embedded default) and `make test` (the test suite).
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export RAY_USAGE_STATS_ENABLED := 0

$(BIN)/.installed: requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

.PHONY: venv run test lint
venv: $(BIN)/.installed

run: venv
	$(BIN)/python -m ray_jobs.pipeline configs/tiny.yaml

test: venv
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff format --check . && $(BIN)/ruff check .
