"""The checks the native kernels make of a numpy array, made in Python too (the numpy reference
paths, and before a call whose wrong input would cost a copy): the same ValueError messages as
csrc/pyarrays.h."""

from __future__ import annotations

from typing import Any

import numpy as np


def float32_matrix(x: Any, name: str) -> np.ndarray:
    """`x` itself if it is a float32 [batch, n] C-contiguous array (no silent copy), else a ValueError
    that names the fix."""
    if not isinstance(x, np.ndarray) or x.dtype != np.float32:
        dtype = getattr(x, "dtype", type(x).__name__)
        raise ValueError(f"{name} must be a float32 array, got dtype {dtype}")
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D [batch, n], got {x.ndim}-D")
    if not x.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (use np.ascontiguousarray)")
    return x
