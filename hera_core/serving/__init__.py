"""Layer 4, serving: HERA assembled from settings and put on the network.

- `assembly`: engines, cloud (real or the stand-in), ledger, budget and runtime from settings.
- `server`: `hera serve`, the OpenAI-compatible hybrid endpoint (`create_app(settings)`).
- `openai_api`: the validated OpenAI request/response slice. `metrics`: Prometheus metrics.
- `cloud_sim`: `hera cloud-sim`, a GGUF model behind an OpenAI-compatible API (the stand-in cloud).

The server talks to the runtime only, never to an engine.
"""
