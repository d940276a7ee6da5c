"""Layer 2, backends: the model engines behind one async interface (`base.Engine`).

- `base`: the interface (`generate`, `prefill`, `cache_stats`, `forward`) and its data types.
- `llamacpp`: the local SLM on llama.cpp (multi-slot KV reuse, chunked decoding).
- `cloud`: any OpenAI-compatible API over aiohttp (retries, circuit breaker).
- `tensorrt`: TensorRT-LLM on an NVIDIA GPU (import-guarded).
- `caching`: the content-addressed completion cache and the engine wrapper that answers from it.

Imports only the native layer below it.
"""

from hera_core.backends.base import Engine, Generation, Message, Prefill

__all__ = ["Engine", "Generation", "Message", "Prefill"]
