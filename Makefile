# The README's commands. Every target creates .venv (CPU PyTorch pinned) on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kronos-installed
PYTEST_ARGS ?=

.PHONY: setup test test-fast demo bench gpu-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[qlib,tracking,serve,dev]'
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The quick lane: everything but the end-to-end and subprocess tests (marked slow).
test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

demo: setup
	$(PY) finetune/train_complete_pipeline.py --cpu --fast-mode --config-path examples/configs/demo.json

bench: setup
	$(PY) benchmarks/inference.py
	$(PY) benchmarks/band_samples.py
	$(PY) benchmarks/data_loading.py
	$(PY) benchmarks/training.py

# On a GPU machine: the machine's python3 (with CUDA PyTorch), no venv; results in $OUT or ./gpu-check/.
gpu-check:
	python3 benchmarks/gpu_check.py

clean:
	rm -rf $(VENV) outputs data
