# Every target installs what it needs into .venv (from pyproject.toml) first,
# so a fresh clone needs nothing but python3 >= 3.11 and make.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MKDOCS_BUILD := NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

.PHONY: demo test docs lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/sluice demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy src
	$(MKDOCS_BUILD)
	$(BIN)/pytest

# The documentation site, into site/; --strict fails on a broken link or anchor and
# on a page missing from the nav (mkdocs.yml). make test runs the same build.
docs: $(STAMP)
	$(MKDOCS_BUILD)

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	$(BIN)/python benchmarks/core.py

clean:
	rm -rf $(VENV)
