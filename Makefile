# softclip: `make demo` and `make test` work on a fresh clone; every target sets up .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.softclip-setup
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
export DATA_ROOT ?= $(CURDIR)/data

# Stage settings (see README): `make extract DATASET=cc3m RAY_ADDRESS=auto NUM_GPUS=8`, `make train CONFIG=... NGPUS=8`.
DATASET ?= shapes
WORKFLOW ?= workflows/configs/$(DATASET).yaml
CONFIG ?=
NGPUS ?= 1
NUM_GPUS ?= 0
RAY_ADDRESS ?=
RUN := $(BIN)/softclip run $(WORKFLOW)

.PHONY: setup demo extract train eval test bench bench-gpu study clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH_PINS)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

# Every stage goes through the workflow runner, so outputs are cached and shared (see workflows/).
demo: setup
	$(BIN)/softclip run workflows/configs/shapes.yaml

extract: setup
	RAY_ADDRESS=$(RAY_ADDRESS) NUM_GPUS=$(NUM_GPUS) $(RUN) --until extract

train: setup
	$(RUN) --until train --nproc $(NGPUS) $(if $(CONFIG),--train-config $(CONFIG))

eval: setup
	$(RUN) --nproc $(NGPUS) $(if $(CONFIG),--train-config $(CONFIG))

test: setup
	$(BIN)/python -m pytest -q

# The speed benchmarks (JSON on stdout; see benchmarks/RESULTS.md). The shapes-world study is separate:
# `make study` (the issue's grid: 66 training runs, a median of 133 s each on an idle 2-core machine, ~2.5 h;
# every run is cached on its own, so an interrupted study continues, and `--methods/--seeds/--noise/--ablations`
# run a subset first).
bench: setup
	$(BIN)/python benchmarks/detector.py
	$(BIN)/python benchmarks/extract_job.py --weights extract/weights/shapes/model.pth \
	  --labelmap extract/weights/shapes/labelmap.json --detector-config extract/weights/shapes/detector.yaml
	$(BIN)/python benchmarks/train.py

# GPU readiness on one CUDA GPU in under 8 minutes (JSON on stdout): X152-C4 600x1000 fp32/bf16 at batch 1-8 with
# and without channels_last, RN50 SoftCLIP vs CLIP training at batch 256 bf16, the extraction job with one GPU
# actor, and the gpu-marked tests. `make bench-gpu SMOKE=1` checks the script at tiny sizes on CPU.
bench-gpu: setup
	$(BIN)/python benchmarks/gpu.py $(if $(SMOKE),--smoke)

study: setup
	$(BIN)/python benchmarks/shapes_study.py --out docs/shapes-study

# Tool caches only. Artifacts are not rubbish: `softclip cache gc WORKFLOW...` removes what no workflow
# needs, `softclip cache ls` shows what is there; delete runs/ and cache/ by hand to drop everything.
clean:
	rm -rf .pytest_cache .ruff_cache build *.egg-info
	find . -path ./.venv -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
