"""Builds hera_core._native (and _native_cuda where nvcc exists) with CMake.

Metadata lives in pyproject.toml; this file only drives the CMake build of csrc/.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


VERSION = _load("_hera_version", ROOT / "hera_core" / "_version.py").__version__
SOURCE_HASH = _load("_hera_srchash", ROOT / "hera_core" / "_srchash.py").source_hash(ROOT / "csrc")


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


def _build_cuda() -> bool:
    return os.environ.get("HERA_BUILD_CUDA", "1") != "0" and shutil.which("nvcc") is not None


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        import pybind11

        if Path(self.get_ext_fullpath(ext.name)).exists() and ext.name.endswith("_cuda"):
            return  # one CMake run builds both modules; the second extension only declares its output
        extdir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_temp = Path(self.build_temp) / "cmake"
        build_temp.mkdir(parents=True, exist_ok=True)
        cmake_args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={extdir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DHERA_VERSION={VERSION}",
            f"-DHERA_SOURCE_HASH={SOURCE_HASH}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        if not _build_cuda():
            cmake_args.append("-DHERA_BUILD_CUDA=OFF")
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 1))
        subprocess.run(["cmake", str(ROOT), *cmake_args], cwd=build_temp, check=True)
        subprocess.run(["cmake", "--build", ".", "-j", jobs], cwd=build_temp, check=True)


# _native_cuda is declared only where nvcc exists, so setuptools installs it there and nowhere else.
setup(
    ext_modules=[CMakeExtension("hera_core._native")] + ([CMakeExtension("hera_core._native_cuda")] if _build_cuda() else []),
    cmdclass={"build_ext": CMakeBuild},
)
