"""Loads the private native module and checks that it matches this source tree.

`load()` returns hera_core._native, or raises ImportError with the command that rebuilds it.
Set HERA_NATIVE=0 to run every component on its pure-Python twin instead (the same tests run
against both; the twins are also the reference in parity tests).
"""

from __future__ import annotations

import functools
import importlib
import os
from pathlib import Path
from types import ModuleType

from hera_core._srchash import source_hash
from hera_core._version import __version__

REBUILD_HINT = "rebuild it with `make build` (or `pip install -e .` in the repository)"


def native_enabled() -> bool:
    """False when HERA_NATIVE=0 asks for the pure-Python twins."""
    return os.environ.get("HERA_NATIVE", "1") != "0"


def _check_build(module: ModuleType, name: str) -> ModuleType:
    """The module's compiled-in version and source hash must match this tree."""
    if module.__version__ != __version__:
        raise ImportError(
            f"hera_core.{name} was built for version {module.__version__}, "
            f"the package is {__version__}; {REBUILD_HINT}"
        )
    # In a source checkout csrc/ sits beside the package: a build from other sources is stale.
    csrc = Path(__file__).resolve().parents[2] / "csrc"
    if csrc.is_dir() and module.__source_hash__ != source_hash(csrc):
        raise ImportError(f"hera_core.{name} is stale: csrc/ changed since it was built; {REBUILD_HINT}")
    return module


@functools.lru_cache(maxsize=None)
def load() -> ModuleType:
    try:
        _native = importlib.import_module("hera_core._native")  # by name: not an import of the package's API
    except ImportError as exc:
        raise ImportError(f"hera_core._native is not built ({exc}); {REBUILD_HINT}") from exc
    return _check_build(_native, "_native")


@functools.lru_cache(maxsize=None)
def load_cuda() -> ModuleType:
    """hera_core._native_cuda (built only where nvcc was found), or ImportError saying why not.

    Importing it needs no GPU; `load_cuda().device_count()` says whether one is usable.
    """
    try:
        _native_cuda = importlib.import_module("hera_core._native_cuda")
    except ImportError as exc:
        raise ImportError(
            f"hera_core._native_cuda is not built ({exc}); it is built when nvcc is found at build "
            f"time; {REBUILD_HINT}"
        ) from exc
    return _check_build(_native_cuda, "_native_cuda")


def cuda_available() -> bool:
    """True when the CUDA module is built and at least one device is visible."""
    try:
        return load_cuda().device_count() > 0
    except ImportError:
        return False
