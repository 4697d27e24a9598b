PYTHON ?= python3
PIP := $(PYTHON) -m pip
LINTED := pyro_relax tests benchmarks docs tutorials examples

.PHONY: torch demo test lint docs tutorials bench gpu-check

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
	$(PYTHON) -m ruff check $(LINTED)
	$(PYTHON) -m ruff format --check $(LINTED)

# The HTML docs, warnings as errors and every reference resolved (-n); the tutorials are
# rendered from their stored outputs. Then a check that the pages load nothing from the network.
docs: torch
	$(PIP) install -q -e ".[docs]"
	$(PYTHON) -m sphinx -W -n --keep-going -q -b html docs docs/_build/html
	$(PYTHON) docs/_ext/check_offline.py docs/_build/html
	@echo "docs: docs/_build/html/index.html"

# Every tutorial top to bottom with its smoke-test switch on (CI=1): small loops, outputs dropped.
tutorials: torch
	$(PIP) install -q -e ".[tutorials]"
	$(PYTHON) tutorials/execute.py --smoke

bench: torch
	$(PIP) install -q -e ".[test]"
	$(PYTHON) benchmarks/bench_gengs.py

# On a machine with CUDA: the CUDA test set and every benchmark on the GPU, one report in
# gpu-check/report.md (benchmarks/gpu_check.py says what it runs).
gpu-check: torch
	$(PIP) install -q -e ".[test]"
	$(PYTHON) benchmarks/gpu_check.py --out gpu-check
