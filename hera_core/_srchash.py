"""Hash of the native sources, shared by setup.py (build time) and hera_core.native (import time).

A source checkout whose csrc/ no longer matches the hash compiled into _native is a stale build.
This module imports nothing from hera_core so setup.py can load it by path.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

_SUFFIXES = (".cpp", ".h", ".hpp", ".cu", ".cuh")


def source_hash(csrc: Path) -> str:
    """sha256 over the relative paths and contents of every native source under csrc/."""
    h = hashlib.sha256()
    for path in sorted(p for p in csrc.rglob("*") if p.suffix in _SUFFIXES and p.is_file()):
        h.update(path.relative_to(csrc).as_posix().encode())
        h.update(b"\0")
        h.update(path.read_bytes())
        h.update(b"\0")
    return h.hexdigest()[:16]
