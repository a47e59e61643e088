# The two commands of the README: `make run` and `make test`. Each builds .venv from
# the project's own files first, so a machine with only Python 3.11+, pip and make works.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint typecheck pytest bench chaos clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[services,dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/portpool up

test: lint typecheck pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy
	$(BIN)/mypy --platform win32 src/portpool
	$(BIN)/mypy --platform darwin src/portpool

pytest: $(STAMP)
	$(BIN)/pytest

bench: $(STAMP)
	$(BIN)/python -m benchmarks

chaos: $(STAMP)
	$(BIN)/python -m benchmarks.chaos $(ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
