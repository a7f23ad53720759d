# posefr-dist: two commands on a fresh machine.
#   make demo   set up .venv/ and run the main job on the embedded default (local Ray, local folder)
#   make test   set up .venv/ and run the test suite
#   make image  build the container image that k8s/ and cluster/aws-gpu.yaml run (Dockerfile)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT ?= out/demo
PYTEST_ARGS ?=
# tests/test_nightly.py starts a real Pushgateway: Debian's prometheus-pushgateway
PUSHGATEWAY := /usr/bin/prometheus-pushgateway
VERSION := $(shell sed -n 's/^version *= *"\([^"]*\)".*/\1/p' pyproject.toml)
IMAGE ?= ghcr.io/posefr/posefr-dist:$(VERSION)

export RAY_USAGE_STATS_ENABLED := 0
export DS_ACCELERATOR ?= cpu
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: setup demo test test-fast test-multihost bench bench-multihost reproduce clean image

setup: $(STAMP) $(PUSHGATEWAY)

# the venv: the CPU build of torch first (so no dependency pulls a CUDA build), then the project
# editable with its test extras. The Dockerfile runs the same script with --cuda.
$(STAMP): pyproject.toml scripts/install.sh
	scripts/install.sh --cpu $(PY) $(VENV)
	touch $(STAMP)

# installed with apt-get when missing; where that is impossible the script says what to install
# and setup goes on (only tests/test_nightly.py needs it)
$(PUSHGATEWAY):
	scripts/install.sh --pushgateway

demo: $(STAMP)
	$(BIN)/posefr demo --out $(OUT)

# everything but the multi-host training runs (tests/test_multihost.py, 9-15 minutes on 2
# cores: `make test-multihost`); the testbed's own tests (tests/test_testbed.py) are included
test: $(STAMP) $(PUSHGATEWAY)
	$(BIN)/python -m pytest -m "not multihost" $(PYTEST_ARGS)

# training and verification across hosts in network namespaces (root and iproute2)
test-multihost: $(STAMP)
	$(BIN)/python -m pytest -m multihost $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/data_pipeline.py
	$(BIN)/python benchmarks/model.py
	$(BIN)/python benchmarks/verify.py
	$(BIN)/python benchmarks/train.py

# the multi-host figures on the namespace testbed (root and iproute2)
bench-multihost: $(STAMP)
	$(BIN)/python benchmarks/multihost.py

# pretrain the 2D encoder once, then the ablation 2d-only vs jam vs jam-je fine-tuned from it over
# 3 seeds (about 62 minutes on 2 cores; resumable)
reproduce: $(STAMP)
	$(BIN)/python benchmarks/reproduce.py --preset cpu --out out/reproduce

# the image named in k8s/ and cluster/aws-gpu.yaml (tag: the version in pyproject.toml)
image:
	docker build -t $(IMAGE) .

clean:
	rm -rf $(VENV) out .cache
