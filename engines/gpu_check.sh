#!/usr/bin/env bash
# The GPU checks of HERA in one run, for a CUDA machine that may have no network.
#
#   bash engines/gpu_check.sh wheels        # here, with the package registry: fetch what the GPU
#                                           # machine's Python lacks into .gpu-wheels/ (about 9 MB)
#   bash engines/gpu_check.sh run [OUTDIR]  # there, from the repository root: build the native
#                                           # modules for that GPU, run the GPU tests and the
#                                           # scoring benchmark, print a short table last
#
# "run" expects python3 with numpy, pytest, pytest-benchmark, hypothesis, aiohttp, rich,
# prometheus-client, pybind11, setuptools, cmake, torch or cupy, and nvcc on the PATH (a CUDA
# image with PyTorch has all of them); .gpu-wheels/ brings xgboost, pydantic, orjson and jsonschema.
# Not covered here: TensorRT-LLM (its wheel is gigabytes and pins its own CUDA and torch; its
# tests in tests/test_gpu_engines.py skip without it) and llama.cpp's CUDA build (engines/README.md).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=.gpu-wheels

case "${1:-}" in
wheels)
  # The versions this checkout's virtualenv runs, as wheels for the GPU image's CPython 3.12.
  HOSTPY=${HOSTPY:-.venv/bin/python}
  mapfile -t pins < <("$HOSTPY" - <<'EOF'
from importlib.metadata import version
for name in ("xgboost-cpu", "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "orjson",
             "jsonschema", "jsonschema-specifications", "referencing", "rpds-py"):
    print(f"{name}=={version(name)}")
EOF
  )
  mkdir -p "$WHEELS"
  "$HOSTPY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$WHEELS" "${pins[@]}" || exit 1
  ls -1 "$WHEELS"
  ;;
run)
  OUTDIR=${2:-${OUT:-gpu-check-out}}
  mkdir -p "$OUTDIR"
  if compgen -G "$WHEELS/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/hera-site "$WHEELS"/*.whl || exit 1
    export PYTHONPATH=/tmp/hera-site
  fi
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUTDIR/gpu.txt"
  nvcc --version | tail -1
  # CUDAARCHS is CMake's default list of GPU architectures: "native" builds for the GPU present.
  echo "building hera_core._native and _native_cuda (log: $OUTDIR/build.log)"
  if ! CUDAARCHS=${CUDAARCHS:-native} "$PY" setup.py build_ext --inplace >"$OUTDIR/build.log" 2>&1; then
    tail -30 "$OUTDIR/build.log"
    exit 1
  fi
  "$PY" -c "from hera_core import native; m = native.load_cuda(); print('CUDA devices seen by _native_cuda:', m.device_count())" || exit 1
  "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py tests/test_gpu_engines.py \
    --junitxml "$OUTDIR/gpu-tests.xml" 2>&1 | tee "$OUTDIR/gpu-tests.log"
  tests_rc=${PIPESTATUS[0]}
  "$PY" -m pytest -q -p no:cacheprovider bench/test_gpu_scoring.py --benchmark-only \
    --benchmark-json "$OUTDIR/gpu-scoring.json" 2>&1 | tee "$OUTDIR/gpu-bench.log" | tail -3
  bench_rc=${PIPESTATUS[0]}
  "$PY" - "$OUTDIR/gpu-scoring.json" <<'EOF'
import json, sys
from collections import defaultdict
try:
    runs = json.load(open(sys.argv[1]))["benchmarks"]
except (OSError, ValueError, KeyError):
    sys.exit("no benchmark results")
groups = defaultdict(dict)
for b in runs:
    side = b["name"].split("[")[0].removeprefix("test_score_")
    groups[b["group"]][side] = b["stats"]["median"]
print(f"\n{'scoring batch':<22}{'cpu':>12}{'gpu':>12}{'gpu_from_host':>15}{'cpu/gpu':>10}")
for group, t in sorted(groups.items(), key=lambda kv: int(kv[0].rsplit("b", 1)[-1])):  # "scoring b64"
    us = lambda side: f"{t[side] * 1e6:.1f} us" if side in t else "-"
    ratio = f"{t['cpu'] / t['gpu']:.1f}x" if "cpu" in t and "gpu" in t else "-"
    print(f"{group:<22}{us('cpu'):>12}{us('gpu'):>12}{us('gpu_from_host'):>15}{ratio:>10}")
EOF
  echo "tests: exit $tests_rc, benchmark: exit $bench_rc (details under $OUTDIR)"
  [ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
  ;;
*)
  echo "usage: bash engines/gpu_check.sh wheels | run [OUTDIR]" >&2
  exit 2
  ;;
esac
