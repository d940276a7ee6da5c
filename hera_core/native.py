"""Loads the private native module and checks that it matches this source tree.

`load()` returns hera_core._native, or raises ImportError with the command that rebuilds it.
Set HERA_NATIVE=0 to run every component on its pure-Python twin instead (the same tests run
against both; the twins are also the reference in parity tests).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from types import ModuleType

from ._srchash import source_hash
from ._version import __version__

REBUILD_HINT = "rebuild it with `make build` (or `pip install -e .` in the repository)"


def native_enabled() -> bool:
    """False when HERA_NATIVE=0 asks for the pure-Python twins."""
    return os.environ.get("HERA_NATIVE", "1") != "0"


@functools.lru_cache(maxsize=None)
def load() -> ModuleType:
    try:
        from . import _native
    except ImportError as exc:
        raise ImportError(f"hera_core._native is not built ({exc}); {REBUILD_HINT}") from exc
    if _native.__version__ != __version__:
        raise ImportError(
            f"hera_core._native was built for version {_native.__version__}, "
            f"the package is {__version__}; {REBUILD_HINT}"
        )
    # In a source checkout csrc/ sits beside the package: a build from other sources is stale.
    csrc = Path(__file__).resolve().parent.parent / "csrc"
    if csrc.is_dir() and _native.__source_hash__ != source_hash(csrc):
        raise ImportError(f"hera_core._native is stale: csrc/ changed since it was built; {REBUILD_HINT}")
    return _native
