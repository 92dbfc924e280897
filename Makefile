# Two entry points for a fresh machine (see README): `make example` and `make test`.
# Both create .venv on first use and install everything the project needs into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: example test lint bench

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

example: $(STAMP)
	$(BIN)/python jobs/example.py

lint: $(STAMP)
	$(BIN)/ruff check anomaly_dask tests jobs

test: lint
	$(BIN)/python -m pytest -q -n 2

bench: $(STAMP)
	$(BIN)/python jobs/bench_features.py
	$(BIN)/python jobs/bench_train_memory.py
