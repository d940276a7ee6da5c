"""The llama.cpp build for this machine: instruction sets chosen on purpose, never AMX.

Why: llama.cpp's default build (GGML_NATIVE) compiles with `-march=native`. On Intel Xeons with AMX
that turns on ggml's AMX kernels, and the first matrix multiply crashed in
`ggml_backend_amx_mul_mat` (Sapphire Rapids, llama-cpp-python 0.3.36), while the same checkout
passed on AMD. So the build names each instruction set from the CPU's own flags, with
GGML_NATIVE=OFF and the three GGML_AMX_* options always OFF.

`HERA_LLAMA_CMAKE_ARGS` replaces the whole choice (a CUDA build for Jetson, a baseline build for a
fleet of mixed CPUs; see docs/cpu-build.md). Standard library only: the Makefile runs this file with the
system Python before anything is installed.

    python3 hera_core/install/llama_build.py            # the CMake args for this CPU
    python3 hera_core/install/llama_build.py --explain  # the same, one reason per line
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

# x86-64: (ggml option, the /proc/cpuinfo flags it needs). Order is ggml's own. AVX-512 sub-options
# only with GGML_AVX512, which itself passes -mavx512{f,cd,vl,dq,bw}.
X86_OPTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("GGML_SSE42", ("sse4_2",)),
    ("GGML_AVX", ("avx",)),
    ("GGML_AVX2", ("avx2",)),
    ("GGML_BMI2", ("bmi2",)),
    ("GGML_FMA", ("fma",)),
    ("GGML_F16C", ("f16c",)),
    ("GGML_AVX_VNNI", ("avx_vnni",)),
    ("GGML_AVX512", ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw")),
    ("GGML_AVX512_VBMI", ("avx512f", "avx512vbmi")),
    ("GGML_AVX512_VNNI", ("avx512f", "avx512_vnni")),
    ("GGML_AVX512_BF16", ("avx512f", "avx512_bf16")),
)
# Never on unless the user's HERA_LLAMA_CMAKE_ARGS asks: the kernels that crashed.
AMX_OPTIONS = ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16")

# aarch64 (Jetson Orin, Graviton): (march extension, the /proc/cpuinfo Features it needs, the
# architecture level that first has it), as ggml's own CPU variants pick them.
ARM_EXTENSIONS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("dotprod", ("asimddp",), "armv8.2-a"),
    ("fp16", ("fphp", "asimdhp"), "armv8.2-a"),
    ("sve", ("sve",), "armv8.2-a"),
    ("i8mm", ("i8mm",), "armv8.6-a"),
)

OVERRIDE_ENV = "HERA_LLAMA_CMAKE_ARGS"


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's feature flags (x86 `flags`, arm `Features`) from /proc/cpuinfo text."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def choose(machine: str, flags: set[str]) -> list[tuple[str, str]]:
    """(CMake arg, reason) pairs for a CPU of this architecture with these flags."""
    chosen = [("-DGGML_NATIVE=OFF", "no -march=native: the build must not depend on where it ran")]
    if machine in ("x86_64", "amd64"):
        for option, needs in X86_OPTIONS:
            missing = [f for f in needs if f not in flags]
            on = not missing
            why = f"CPU has {'+'.join(needs)}" if on else f"CPU lacks {'+'.join(missing)}"
            chosen.append((f"-D{option}={'ON' if on else 'OFF'}", why))
        for option in AMX_OPTIONS:
            chosen.append((f"-D{option}=OFF", "AMX kernels crashed in ggml_backend_amx_mul_mat"))
    elif machine in ("aarch64", "arm64"):
        level, extensions = "armv8-a", []
        for ext, needs, min_level in ARM_EXTENSIONS:
            if any(f in flags for f in needs):
                extensions.append(ext)
                level = max(level, min_level)
        arch = level + "".join(f"+{e}" for e in extensions)
        chosen.append((f"-DGGML_CPU_ARM_ARCH={arch}", f"CPU features: {', '.join(extensions) or 'baseline'}"))
    return chosen


def cmake_args(machine: str | None = None, flags: set[str] | None = None) -> str:
    """The CMAKE_ARGS for llama-cpp-python's build: the override if set, else chosen for this CPU."""
    override = os.environ.get(OVERRIDE_ENV, "").strip()
    if override:
        return override
    machine = (machine or platform.machine()).lower()
    return " ".join(arg for arg, _ in choose(machine, cpu_flags() if flags is None else flags))


def main(argv: list[str]) -> int:
    if "--explain" in argv:
        if os.environ.get(OVERRIDE_ENV, "").strip():
            print(f"{OVERRIDE_ENV} is set; using it as it is: {cmake_args()}")
            return 0
        for arg, why in choose(platform.machine().lower(), cpu_flags()):
            print(f"  {arg:28} {why}")
        return 0
    print(cmake_args())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
