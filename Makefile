# Two commands: `make train` trains the default tiny model, `make test` runs lint and tests.
# Both create .venv (if missing) and install lcx into it from the lock for its Python
# (requirements/py3XX.txt, refreshed by `make lock`).
#
# Environments: .venv is the default Python (3.11 here: JAX 0.10.2, torch for the
# Hugging Face references); .venv-latest is Python 3.12 with the newest JAX, as Colab has
# (`make venv-latest`, `make test-latest`; skipped with a message where no 3.12 exists).

PYTHON ?= python3
VENV ?= .venv
CONFIG ?= configs/lm_tiny.py
# runs/<config name>: `make train CONFIG=configs/lm_tiny_dd.py` trains in runs/lm_tiny_dd.
WORKDIR ?= runs/$(basename $(notdir $(CONFIG)))
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lcx-installed
PYVER := $(shell $(PYTHON) -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')
# Python 3.12: `python3.12` if it runs, else the newest pyenv 3.12 (pyenv's shim for a
# version that is not selected exists but fails, so each candidate is run once).
PYTHON_LATEST ?= $(shell for p in python3.12 $$(ls -d $${PYENV_ROOT:-$$HOME/.pyenv}/versions/3.12*/bin/python3.12 2>/dev/null | sort -V | tail -n 1); do $$p -c '' 2>/dev/null && { command -v $$p; break; }; done)
VENV_LATEST ?= .venv-latest
PY_LATEST := $(VENV_LATEST)/bin/python
STAMP_LATEST := $(VENV_LATEST)/.lcx-installed
NO_LATEST := echo "make: no Python 3.12 found (python3.12, or pyenv's versions/3.12*); skipping the latest-JAX environment. Set PYTHON_LATEST=/path/to/python3.12 to use one."

PYTEST = JAX_PLATFORMS=cpu $(1) -m pytest -n 2 --durations=15
# Tiers (markers in pyproject.toml): `slow` process-level tests (CI runs them: test-slow),
# `notebook` the notebooks, `integration` whole jobs (training runs, the command line, the
# engine, benchmark smokes), `torch` the transformers references.
FAST := not slow and not notebook and not integration

.PHONY: train processes test test-fast test-slow test-latest venv-latest lint format lock bench clean

$(STAMP): requirements/py$(PYVER).txt setup.cfg pyproject.toml
	@test -f requirements/py$(PYVER).txt || { echo "make: no lock for Python $(PYVER) in requirements/; use Python 3.11 or 3.12, or PYTHON=python3.11"; exit 2; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements/py$(PYVER).txt
	$(PY) -m pip install --quiet --no-deps -e .
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

# Everything but the process-level tests (durations in BENCHMARKS.md; the target is 15 minutes).
test: lint
	$(call PYTEST,$(PY)) -m "not slow" tests

# The iteration tier: no notebooks, whole jobs or process-level tests (the target is 5 minutes).
test-fast: $(STAMP)
	$(call PYTEST,$(PY)) -m "$(FAST)" tests

# The process-level tests: several processes, kills, restarts (CI runs them).
test-slow: $(STAMP)
	$(call PYTEST,$(PY)) -m slow tests

venv-latest:
	@if [ -z "$(PYTHON_LATEST)" ]; then $(NO_LATEST); else $(MAKE) --no-print-directory $(STAMP_LATEST); fi

$(STAMP_LATEST): requirements/py312.txt setup.cfg pyproject.toml
	test -x $(PY_LATEST) || $(PYTHON_LATEST) -m venv $(VENV_LATEST)
	$(PY_LATEST) -m pip install --quiet --upgrade pip
	$(PY_LATEST) -m pip install --quiet -r requirements/py312.txt
	$(PY_LATEST) -m pip install --quiet --no-deps -e .
	touch $(STAMP_LATEST)

# The fast tier and the notebooks on Python 3.12 with the newest JAX (no torch there).
test-latest: venv-latest
	@if [ -n "$(PYTHON_LATEST)" ]; then $(call PYTEST,$(PY_LATEST)) -m "not slow and not torch" tests; fi

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# Refresh both locks from setup.cfg's ranges with uv (pinned, in its own small venv).
UV_VERSION := 0.13.9
UV := .venv-lock/bin/uv
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels)
LOCK = $(UV) pip compile setup.cfg --quiet --upgrade --custom-compile-command "make lock" --python-version $(1) $(2) -o requirements/py$(subst .,,$(1)).txt
lock:
	test -x $(UV) || { $(PYTHON) -m venv .venv-lock && .venv-lock/bin/pip install --quiet uv==$(UV_VERSION); }
	# The reference extra (torch, transformers) only where torch's CPU build exists: 3.11.
	$(call LOCK,3.11,--extra test --extra harness --extra reference $(FIND_LINKS))
	$(call LOCK,3.12,--extra test --extra harness)

bench: $(STAMP)
	$(PY) benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) $(VENV_LATEST) .venv-lock runs .pytest_cache .ruff_cache
