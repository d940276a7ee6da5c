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

# Build tools first, then the package without build isolation, so the native build uses them.
$(VENV)/.installed: $(PY) pyproject.toml setup.py
	$(PIP) install -q setuptools wheel "pybind11>=2.12" "cmake>=3.18" ninja
	$(PIP) install -q -e ".[test]" --no-build-isolation
	touch $@

install: $(VENV)/.installed

# Rebuild the native extension after editing csrc/.
build: $(VENV)/.installed
	$(PIP) install -q -e . --no-build-isolation --no-deps

models: install
	$(HERA) models ensure

models-test: install
	$(HERA) models ensure smollm2-135m

run: build models
	$(HERA) demo

demo: run

test: build models-test
	$(PY) -m pytest -q

bench: build models-test
	$(PY) -m pytest bench --benchmark-only -q

clean:
	rm -rf build *.egg-info hera_core/*.so $(VENV)
