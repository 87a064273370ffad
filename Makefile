# teamorch — the README's commands. Everything installs into .venv; nothing is assumed on the machine but Python 3.10+ and a C/C++ compiler.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# llama-cpp-python compiles from source the first time (pip caches the wheel afterwards). teamorch uses only the
# library: the multimodal library (LLAVA) and the command-line tools are not built, which cuts the compile
# (measured in README "Install"). On x86-64 we build a portable AVX2 binary instead of -march=native: a native
# build on a host CPU with AMX segfaults inside VMs that do not grant AMX state, and a portable wheel in pip's
# cache stays valid on any machine.
LLAMA_SLIM := -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TOOLS=OFF
ifeq ($(shell uname -m),x86_64)
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON $(LLAMA_SLIM)
else
LLAMA_CMAKE_ARGS ?= $(LLAMA_SLIM)
endif

.PHONY: install demo test test-fast lint bench bench-faults clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel

$(STAMP): pyproject.toml | $(BIN)/python
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip install -e ".[local,dev]"
	touch $@

install: $(STAMP)

demo: $(STAMP)
	@mkdir -p out
	$(BIN)/teamorch run scenarios/complex_error.yaml --json out/complex_error.json

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -ra

# Pure policies, messages, config, journal, simulator and CLI parsing: no Ray, no model, seconds.
test-fast: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -ra --fast

bench: $(STAMP)
	$(BIN)/pip install -q -e ".[bench]"
	$(BIN)/python -m benchmarks.run_all

# Each fault (server killed, 503 storm, stall, bad stream, actor kills, driver SIGKILL + resume, server restart)
# against the same run without it, on simulators: a Markdown table, ~3 min.
bench-faults: $(STAMP)
	$(BIN)/python -m benchmarks.faults

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache *.egg-info
