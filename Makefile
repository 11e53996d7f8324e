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
# One tag scheme (components/image.py): every image is tagged <version> and <version>-<sha>; the overlays and
# the compiled pipeline pin <version> (IMAGE_TAG=$(VERSION)-$(GIT_SHA) compiles against one exact build).
IMAGE_TAG ?= $(VERSION)
BUILD_TAG := $(VERSION)-$(GIT_SHA)
# each image installs only its extra (components/image.py IMAGE_EXTRAS); base first, the others FROM it
IMAGES := ingest preprocess train evaluate register promote serve predict deploy tracking
# torch wheel per image: cpu (PyTorch's CPU index) or cuda (PyPI's wheel with the NVIDIA runtime)
TORCH_VARIANT ?= cpu
TRAIN_TORCH_VARIANT ?= cuda
NO_TORCH_IMAGES := ingest serve deploy tracking
# docker when an engine answers, else buildah; with neither, `make images` prints the commands to run elsewhere
BUILDER := $(shell (docker info >/dev/null 2>&1 && echo docker) || (command -v buildah >/dev/null 2>&1 && echo buildah) || echo none)
BUILD := $(if $(filter none,$(BUILDER)),@echo docker,$(BUILDER))

.PHONY: install demo test test-fast test-tools compile images image-base $(addprefix image-,$(IMAGES)) clean help

help:
	@echo "make demo      set up, then run synthetic data -> kfp.local pipeline -> MLflow -> KServe (<= 15 min)"
	@echo "make test      set up, then run the test suite (unit + end-to-end)"
	@echo "make test-fast unit tests only (no slow end-to-end tests)"
	@echo "make compile   compile the pipeline to pipelines/compiled/<name>-<version>.yaml (images tagged IMAGE_TAG)"
	@echo "make images    build the images, each with its extra only, tagged VERSION and VERSION-SHA (docker/buildah), or print the commands"

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
# promtool (Debian's prometheus) checks and unit-tests the alert rules; buildah and debootstrap build the serve
# image without a daemon from a Debian root (tests/test_dockerfiles.py). Installed from Debian when missing
# and we may (root, apt); otherwise those tests skip and say why.
APT_TEST_TOOLS := chromium:chromium prometheus:promtool buildah:buildah debootstrap:debootstrap
test-tools:
	@missing=""; for pair in $(APT_TEST_TOOLS); do command -v $${pair#*:} >/dev/null 2>&1 || missing="$$missing $${pair%%:*}"; done; \
	if [ -n "$$missing" ]; then \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null && echo "installed:$$missing"; } || \
	  echo "not available:$$missing (tests that need them will be skipped)"; fi

# two workers on the two cores, one test file each at a time (module fixtures built once; pipeline runs of one file in order)
test: $(STAMP) test-tools
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=25 -n 2 --dist loadfile

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

compile: $(STAMP)
	MEDSEG_IMAGE_REGISTRY=$(IMAGE_REGISTRY) MEDSEG_IMAGE_TAG=$(IMAGE_TAG) $(BIN)/medseg pipeline compile

images: image-base $(addprefix image-,$(IMAGES))
	@if [ "$(BUILDER)" = none ]; then echo "# no container engine here (docker daemon or buildah): the commands above build the images elsewhere"; fi

image-base:
	$(BUILD) build -f components/Dockerfile.base -t $(IMAGE_REGISTRY)/medseg-base:$(VERSION) -t $(IMAGE_REGISTRY)/medseg-base:$(BUILD_TAG) .

$(addprefix image-,$(IMAGES)): image-%: image-base
	$(BUILD) build -f components/$*/Dockerfile --build-arg BASE_IMAGE=$(IMAGE_REGISTRY)/medseg-base:$(BUILD_TAG) \
	  $(if $(filter $(NO_TORCH_IMAGES),$*),,--build-arg TORCH_VARIANT=$(if $(filter train,$*),$(TRAIN_TORCH_VARIANT),$(TORCH_VARIANT))) --build-arg GIT_COMMIT=$(GIT_COMMIT) \
	  -t $(IMAGE_REGISTRY)/medseg-$*:$(VERSION) -t $(IMAGE_REGISTRY)/medseg-$*:$(BUILD_TAG) .

clean:
	rm -rf work demo_output .pytest_cache
