# medseg-ops: `make demo` runs the whole platform on synthetic data; `make test` runs the tests.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# pip on this machine is capped at torch<=2.14.1; 2.13.0's CPU wheel is on disk. Installing torch first,
# then everything else constrained to it, keeps pip from swapping in a multi-GB CUDA build.
TORCH := torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast test-all compile clean help

help:
	@echo "make demo      set up, then run synthetic data -> kfp.local pipeline -> MLflow -> KServe (<= 15 min)"
	@echo "make test      set up, then run the test suite (unit + end-to-end)"
	@echo "make test-fast unit tests only (no slow end-to-end tests)"
	@echo "make compile   compile the pipeline to pipelines/compiled/<name>-<version>.yaml"

$(STAMP): requirements/lock.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	echo "$(TORCH)" > $(VENV)/torch-constraint.txt
	$(BIN)/python -m pip install --quiet -r requirements/lock.txt -c $(VENV)/torch-constraint.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	$(BIN)/python -m pip check
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/medseg demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

compile: $(STAMP)
	$(BIN)/medseg pipeline compile

clean:
	rm -rf work demo_output .pytest_cache
