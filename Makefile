# Two entry points for a fresh machine (Python 3.11 + pip, no root, no services):
#   make run   — install what running needs from the frozen pdm.lock, then start `cozy dev`
#   make test  — install everything from the frozen pdm.lock, then lint, type-check, run the suite
#   make test-fast — the edit-test loop: lint and the suite without the tests marked `slow`
# pdm itself is bootstrapped from PyPI into .tools/pdm (project-local, pinned; see
# ../shared/SETUP-NOTES.md for why hishel is pinned beside it).

PYTHON ?= python3
# Python keeps compiled bytecode in __pycache__/ (git-ignored) so the next process skips compiling.
# Some machines set PYTHONDONTWRITEBYTECODE for every process; the suite starts a few hundred
# `cozy` and relay processes, and each of them then recompiled the client kit, Trio, msgspec …
# (~0.5 s of CPU a process, minutes of the suite). Every recipe here runs without it.
unexport PYTHONDONTWRITEBYTECODE
PDM_HOME := .tools/pdm
PDM := $(PDM_HOME)/bin/pdm
VENV := .venv
STAMP := $(VENV)/.cozy-installed
RUN_STAMP := $(VENV)/.cozy-run-installed
ARGS ?=
# pytest-xdist: one worker per core of the 2-core CI machine, each with its own embedded Postgres
# (per-worker temp dirs). --dist loadfile keeps a file on one worker, so module-scoped relays
# are started once and tests that run after their file's others still do.
WORKERS ?= 2
PARALLEL := -n $(WORKERS) --dist loadfile

.PHONY: run test test-fast lint typecheck pytest install clean

$(PDM):
	$(PYTHON) -m venv $(PDM_HOME)
	$(PDM_HOME)/bin/pip install --quiet --disable-pip-version-check "pdm==2.29.4" "hishel[httpx2]>=1.4,<2"

# `pdm sync` installs exactly what pdm.lock says and never re-resolves. Two stamps: `make run`
# installs the runtime dependencies only (`--prod`: no linters, test or bench tools); `make test`
# installs every group and removes strays (`--clean`), which also satisfies `make run`. A run
# install never removes test tools a test install put there, so `make test` after `make run`
# only adds what is missing, and `make run` after `make test` does nothing.
define VENV_FOR_PDM
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(PDM) use --quiet --first $(VENV)/bin/python
endef

$(RUN_STAMP): $(PDM) pdm.lock pyproject.toml
	$(VENV_FOR_PDM)
	$(PDM) sync --prod
	touch $(RUN_STAMP)

$(STAMP): $(PDM) pdm.lock pyproject.toml
	$(VENV_FOR_PDM)
	$(PDM) sync --clean
	touch $(STAMP) $(RUN_STAMP)

install: $(STAMP)

run: $(RUN_STAMP)
	$(VENV)/bin/cozy dev $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

typecheck: $(STAMP)
	$(VENV)/bin/mypy

pytest: $(STAMP)
	$(VENV)/bin/pytest $(PARALLEL) $(ARGS)

test: lint typecheck pytest

# Not what CI runs: `make test` stays the complete check. Skips mypy and the `slow` tests
# (child processes, fault scenarios, the relay fuzzers and property tests against a real relay).
test-fast: lint
	$(VENV)/bin/pytest $(PARALLEL) -m "not slow" $(ARGS)

clean:
	rm -rf $(VENV) $(PDM_HOME) .pytest_cache .mypy_cache .ruff_cache
