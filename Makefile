# The two commands of the README: `make run` and `make test`. Each builds .venv from
# the project's own files first, so a machine with only Python 3.11+, pip and make works.
# `make run` installs only what running needs; `make test` adds the dev tools.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUN_STAMP := $(VENV)/.installed-run
STAMP := $(VENV)/.installed

.PHONY: run test lint typecheck pytest bench chaos clean build-run build-dev

# Each build runs once under a lock: a second `make run` in another terminal (the README's
# instance 2) waits for the first one's build instead of building the same .venv at once.
LOCKED := $(PYTHON) tools/under_lock.py $(VENV).lock

$(RUN_STAMP): pyproject.toml
	@$(LOCKED) $@ $^ -- $(MAKE) --no-print-directory build-run

$(STAMP): $(RUN_STAMP)
	@$(LOCKED) $@ $^ -- $(MAKE) --no-print-directory build-dev

# The builds themselves; use `make run` / `make test`, which build only what is missing.
build-run:
	$(PYTHON) -m venv $(VENV)
	@echo "Installing portpool and the reference services' packages into $(VENV) (about a minute)..."
	$(BIN)/python -m pip install --progress-bar on --upgrade pip
	$(BIN)/python -m pip install --progress-bar on -e '.[services]'
	touch $(RUN_STAMP)

build-dev:
	@echo "Installing the dev tools (pytest, ruff, mypy, the benchmarks' peers)..."
	$(BIN)/python -m pip install --progress-bar on -e '.[services,dev]'
	touch $(STAMP)

run: $(RUN_STAMP)
	$(BIN)/portpool up

test: lint typecheck pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks tools
	$(BIN)/ruff format --check src tests benchmarks tools
	$(BIN)/lint-imports

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
	rm -rf $(VENV) $(VENV).lock .mypy_cache .ruff_cache .pytest_cache
