# Two commands do all set-up on a fresh machine (see README):
#   make run    install into .venv and run the main job on the built-in data
#   make test   install into .venv and run the test suites CI runs
VENV ?= .venv
BIN := $(VENV)/bin
PYTHON ?= python3

$(BIN)/.fmx-installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $@

.PHONY: install run test test-slow bench
install: $(BIN)/.fmx-installed

run: install
	$(BIN)/fmx run

test: install
	$(BIN)/ruff check .
	$(BIN)/mypy common features fm experts fmx dags
	$(BIN)/python -m pytest -q
	infra/ci-setup.sh
	$(BIN)/python -m pytest -q -m e2e tests/e2e

test-slow: install
	$(BIN)/python -m pytest -q -m slow

bench: install
	$(BIN)/python bench/bench_data.py
	$(BIN)/python bench/bench_fm.py
