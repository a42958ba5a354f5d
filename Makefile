# softclip: `make demo` and `make test` work on a fresh clone; every target sets up .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.softclip-setup
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
export DATA_ROOT ?= $(CURDIR)/data

# Stage settings (see README): `make extract DATASET=cc3m RAY_ADDRESS=auto NUM_GPUS=8`, `make train CONFIG=... NGPUS=8`.
DATASET ?= shapes
CONFIG ?=
NGPUS ?= 1
NUM_GPUS ?= 0

.PHONY: setup demo extract train eval test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH_PINS)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: setup
	@echo "make demo: not built yet (the workflow runner lands with the workflows issue)"; exit 1

extract: setup
	@echo "make extract: not built yet (the Ray extraction job lands with its issue)"; exit 1

train: setup
	@echo "make train: not built yet (training lands with its issue)"; exit 1

eval: setup
	@echo "make eval: not built yet (evaluation lands with its issue)"; exit 1

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	@for script in benchmarks/*.py; do echo "== $$script"; $(BIN)/python $$script || exit 1; done

clean:
	rm -rf runs cache .pytest_cache .ruff_cache build *.egg-info
