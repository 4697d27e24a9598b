PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: torch demo test lint bench

# Install torch before the package: with no torch present, pip resolves `torch>=2.1` to the
# newest CUDA build (several GB). 2.13.0 is the CPU wheel this project's machines carry.
torch:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "torch==2.13.0"

demo: torch
	$(PIP) install -q -e ".[demo]"
	$(PYTHON) -m pyro_relax demo

test: torch
	$(PIP) install -q -e ".[test]"
	$(PYTHON) -m pytest

lint: torch
	$(PIP) install -q -e ".[test]"
	$(PYTHON) -m ruff check pyro_relax tests benchmarks
	$(PYTHON) -m ruff format --check pyro_relax tests benchmarks

bench: torch
	$(PIP) install -q -e ".[test]"
	$(PYTHON) benchmarks/bench_gengs.py
