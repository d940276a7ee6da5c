"""Layer 1, native: the C++ core (hera_core._native) and a pure-Python twin of each component.

- `loader`: loads the compiled module lazily, checks its version and source hash (a stale build
  names the rebuild command); `HERA_NATIVE=0` selects the twins everywhere.
- `features`: logit features of the SLM's last prompt position (entropy, top-1 prob, margin).
- `forest`: the XGBoost-JSON tree evaluator (and `Forest.to_cuda()` for the GPU module).
- `radix`: the KV-cache radix index.

Imports nothing from the layers above (backends, routing, serving, offline, gpu).
"""

from hera_core.native.loader import cuda_available, load, load_cuda, native_enabled

__all__ = ["cuda_available", "load", "load_cuda", "native_enabled"]
