# One-command set-up: every target bootstraps a local virtualenv from pyproject.toml.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: demo test lint typecheck unit docs clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,dev,docs]'
	touch $@

demo: $(VENV)/.installed
	$(PY) -m stalk demo

lint: $(VENV)/.installed
	$(PY) -m ruff check src tests vectors examples fuzz docs/conf.py
	$(PY) -m ruff format --check src tests vectors examples fuzz docs/conf.py

typecheck: $(VENV)/.installed
	$(PY) -m mypy

unit: $(VENV)/.installed
	$(PY) -m pytest -q

# The documentation site, warnings as errors (docs/conf.py makes a broken cross-reference
# one); -E builds afresh, so a warning is never hidden behind pages cached by a run before.
docs: $(VENV)/.installed
	$(PY) -m sphinx -W --keep-going -E -q -b html docs docs/_build/html
	@echo "docs: open docs/_build/html/index.html"

test: lint typecheck unit docs

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache .hypothesis docs/_build
