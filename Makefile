# The README's commands. Every target creates .venv (PyTorch 2.13.0 pinned) on first use.
# Which torch build: pip's default index decides (pypi.org: the CUDA build on Linux x86_64, which also runs on
# CPU-only machines; the CPU build on macOS and Windows). CPU-only on Linux:
#   make setup TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kronos-installed
PYTEST_ARGS ?=
TORCH_INDEX_URL ?=

.PHONY: setup test test-fast lint demo bench gpu-check clean starter

setup: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0 $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(PY) -m pip install -q -e '.[qlib,tracking,serve,lora,crypto,dev]'
	$(PY) -c "import torch; print('installed torch', torch.__version__, '(CUDA ' + torch.version.cuda + ')' if torch.version.cuda else '(CPU-only build)')"
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Lint, format, import layers (pyproject: [tool.ruff], [tool.importlinter]) and types ([tool.mypy]).
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

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
	$(PY) benchmarks/serve.py

# On a GPU machine: the machine's python3 (with CUDA PyTorch), no venv; results in $OUT or ./gpu-check/.
gpu-check:
	python3 benchmarks/gpu_check.py

clean:
	rm -rf $(VENV) outputs data

# Rebuild the starter pair (examples/models/starter/) from the real A-share data (about 30 min on 2 CPU cores).
STARTER_DATA ?= ../shared/data/qlib_cn_2010_2024
starter: setup
	$(PY) tools/build_starter.py --data $(STARTER_DATA)
