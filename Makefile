# posefr-dist: two commands on a fresh machine.
#   make demo   set up .venv/ and run the main job on the embedded default (local Ray, local folder)
#   make test   set up .venv/ and run the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT ?= out/demo
PYTEST_ARGS ?=

export RAY_USAGE_STATS_ENABLED := 0
export DS_ACCELERATOR ?= cpu
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: setup demo test test-fast bench reproduce clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade --quiet pip
	# the CPU build of torch first, so no dependency pulls a CUDA build
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/posefr demo --out $(OUT)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/data_pipeline.py
	$(BIN)/python benchmarks/model.py
	$(BIN)/python benchmarks/verify.py
	$(BIN)/python benchmarks/train.py

# pretrain the 2D encoder once, then the ablation 2d-only vs jam vs jam-je fine-tuned from it over
# 3 seeds (about 62 minutes on 2 cores; resumable)
reproduce: $(STAMP)
	$(BIN)/python benchmarks/reproduce.py --preset cpu --out out/reproduce

clean:
	rm -rf $(VENV) out .cache
