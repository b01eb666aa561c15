# Two entry points for a fresh machine (Python 3.11 + pip, no root, no services):
#   make run   — install from the frozen pdm.lock, then start the embedded stack (`cozy dev`)
#   make test  — install from the frozen pdm.lock, then lint, type-check and run the whole suite
# pdm itself is bootstrapped from PyPI into .tools/pdm (project-local, pinned; see
# ../shared/SETUP-NOTES.md for why hishel is pinned beside it).

PYTHON ?= python3
PDM_HOME := .tools/pdm
PDM := $(PDM_HOME)/bin/pdm
VENV := .venv
STAMP := $(VENV)/.cozy-installed
ARGS ?=

.PHONY: run test lint typecheck pytest install clean

$(PDM):
	$(PYTHON) -m venv $(PDM_HOME)
	$(PDM_HOME)/bin/pip install --quiet --disable-pip-version-check "pdm==2.29.4" "hishel[httpx2]>=1.4,<2"

# `pdm sync` installs exactly what pdm.lock says and never re-resolves; --clean removes strays.
$(STAMP): $(PDM) pdm.lock pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(PDM) use --quiet --first $(VENV)/bin/python
	$(PDM) sync --clean
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/cozy dev $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

typecheck: $(STAMP)
	$(VENV)/bin/mypy

pytest: $(STAMP)
	$(VENV)/bin/pytest $(ARGS)

test: lint typecheck pytest

clean:
	rm -rf $(VENV) $(PDM_HOME) .pytest_cache .mypy_cache .ruff_cache
