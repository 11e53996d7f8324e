# medseg-ops: `make demo` runs the whole platform on synthetic data; `make test` runs the tests.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# pip on this machine is capped at torch<=2.14.1; 2.13.0's CPU wheel is on disk. Installing torch first,
# then everything else constrained to it, keeps pip from swapping in a multi-GB CUDA build.
TORCH := torch==2.13.0
STAMP := $(VENV)/.installed

VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
GIT_COMMIT := $(shell git rev-parse HEAD 2>/dev/null || echo unknown)
GIT_SHA := $(shell git rev-parse --short=8 HEAD 2>/dev/null || echo nogit)
IMAGE_REGISTRY ?= ghcr.io/medseg-ops
IMAGE_TAG ?= $(VERSION)-$(GIT_SHA)
STAGES := ingest preprocess train evaluate register promote serve predict deploy
# docker when an engine answers, else buildah; with neither, `make images` prints the commands to run elsewhere
BUILDER := $(shell (docker info >/dev/null 2>&1 && echo docker) || (command -v buildah >/dev/null 2>&1 && echo buildah) || echo none)

.PHONY: install demo test test-fast test-tools compile images clean help

help:
	@echo "make demo      set up, then run synthetic data -> kfp.local pipeline -> MLflow -> KServe (<= 15 min)"
	@echo "make test      set up, then run the test suite (unit + end-to-end)"
	@echo "make test-fast unit tests only (no slow end-to-end tests)"
	@echo "make compile   compile the pipeline to pipelines/compiled/<name>-<version>.yaml (images tagged IMAGE_TAG)"
	@echo "make images    build the component images (docker/buildah), or print the build commands"

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

# Tools some tests drive from outside Python: headless Chromium renders the HTML report and the viewer;
# promtool (Debian's prometheus) checks and unit-tests the alert rules. Installed from Debian when missing
# and we may (root, apt); otherwise those tests skip and say why.
APT_TEST_TOOLS := chromium:chromium prometheus:promtool
test-tools:
	@missing=""; for pair in $(APT_TEST_TOOLS); do command -v $${pair#*:} >/dev/null 2>&1 || missing="$$missing $${pair%%:*}"; done; \
	if [ -n "$$missing" ]; then \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null && echo "installed:$$missing"; } || \
	  echo "not available:$$missing (tests that need them will be skipped)"; fi

test: $(STAMP) test-tools
	$(BIN)/python -m pytest -q -p no:cacheprovider

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

compile: $(STAMP)
	MEDSEG_IMAGE_REGISTRY=$(IMAGE_REGISTRY) MEDSEG_IMAGE_TAG=$(IMAGE_TAG) $(BIN)/medseg pipeline compile

images:
	@$(MAKE) --no-print-directory _images RUN=$(if $(filter none,$(BUILDER)),echo,) BUILD=$(if $(filter none,$(BUILDER)),docker,$(BUILDER))
	@if [ "$(BUILDER)" = none ]; then echo "# no container engine here (docker daemon or buildah): the commands above build the images elsewhere"; fi

_images:
	@$(RUN) $(BUILD) build -f components/Dockerfile.base --build-arg GIT_COMMIT=$(GIT_COMMIT) -t $(IMAGE_REGISTRY)/medseg-base:$(IMAGE_TAG) .
	@for stage in $(STAGES); do \
	  if [ $$stage = train ]; then args="--build-arg GIT_COMMIT=$(GIT_COMMIT)"; else args="--build-arg BASE_IMAGE=$(IMAGE_REGISTRY)/medseg-base:$(IMAGE_TAG)"; fi; \
	  $(RUN) $(BUILD) build -f components/$$stage/Dockerfile $$args -t $(IMAGE_REGISTRY)/medseg-$$stage:$(IMAGE_TAG) . || exit 1; \
	done

clean:
	rm -rf work demo_output .pytest_cache
