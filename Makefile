# The two commands a newcomer needs:
#   make run    run the bot on its embedded defaults (SQLite, shipped model, local platform, dashboard)
#   make test   run the whole test suite
# Both create the virtualenv they need on first use.

PYTHON ?= python3
VENV ?= .venv
PIP := $(VENV)/bin/pip
STAMP_RUN := $(VENV)/.installed-run
STAMP_TEST := $(VENV)/.installed-test

.PHONY: run test install install-test clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(STAMP_RUN): pyproject.toml | $(VENV)/bin/python
	$(PIP) install --quiet -e .
	touch $@

# torch==2.13.0 (CPU) is pinned in the train extra; pip takes it from the local wheel cache.
$(STAMP_TEST): pyproject.toml | $(VENV)/bin/python
	$(PIP) install --quiet -e '.[train,test,bench]'
	touch $@ $(STAMP_RUN)

install: $(STAMP_RUN)
install-test: $(STAMP_TEST)

run: $(STAMP_RUN)
	$(VENV)/bin/dallebot serve

test: $(STAMP_TEST)
	$(VENV)/bin/python -m pytest

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
