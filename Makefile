# Two commands: `make train` trains the default tiny model, `make test` runs lint and tests.
# Both create .venv (if missing) and install lcx into it from setup.cfg.

PYTHON ?= python3
VENV ?= .venv
CONFIG ?= configs/lm_tiny.py
# runs/<config name>: `make train CONFIG=configs/lm_tiny_dd.py` trains in runs/lm_tiny_dd.
WORKDIR ?= runs/$(basename $(notdir $(CONFIG)))
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lcx-installed

.PHONY: train processes test lint format bench clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

train: $(STAMP)
	$(PY) -m lcx.main --config $(CONFIG) --workdir $(WORKDIR)

# N local processes of one run, as N hosts would run it (multi-process JAX on the CPU).
PROCESSES ?= 2
processes: $(STAMP)
	$(PY) scripts/local_processes.py --processes $(PROCESSES) -- --config $(CONFIG) --workdir $(WORKDIR)

lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

test: lint
	JAX_PLATFORMS=cpu $(PY) -m pytest -n 2 --durations=10 tests

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: $(STAMP)
	$(PY) benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
