# Two commands on a fresh machine: `make demo`, then `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,export,optuna,slurm,tensorboard,mlflow]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/dlrun train

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

lint: $(STAMP)
	$(BIN)/ruff check dlrun hydra_plugins tests benchmarks
	$(BIN)/ruff format --check dlrun hydra_plugins tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py --json outputs/bench.json

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
