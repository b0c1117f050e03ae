# Two entry points: `make demo` and `make test`. Both build .venv from scratch on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint typecheck unit clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/python examples/demo.py

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.installed
	$(BIN)/mypy

# Two pytest-xdist workers: most of the suite's time is end-to-end tests waiting on subprocesses.
unit: $(VENV)/.installed
	$(BIN)/coverage erase
	$(BIN)/coverage run -m pytest -n 2
	$(BIN)/coverage combine --quiet || true
	$(BIN)/coverage report

test: lint typecheck unit

clean:
	rm -rf $(VENV) .cache .coverage* .mypy_cache .pytest_cache .ruff_cache
