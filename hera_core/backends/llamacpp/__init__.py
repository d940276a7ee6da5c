"""Local SLM engine on llama.cpp (llama-cpp-python's low-level bindings), the embedded default.

KV-cache reuse across agent steps and interleaved sessions, without copying states in and out:
one llama.cpp context holds up to `n_slots` sequences (llama.cpp sequence ids) whose KV stays in
place between requests. A radix index maps cached prompt prefixes to the slots that hold them,
and a new prompt goes to the slot sharing its longest prefix: only its new tokens are evaluated
(`kvcache` says how slots are continued, linked and evicted).

Two cache layouts (`kv_unified`): per-slot streams (default) keep each slot's attention over its
own tokens only, and linking a prefix copies the source stream once on the device (a memcpy of
its KV, no recomputation); a unified cache links a prefix by tagging cells (no copy at all, the
prefix is stored once) but every token then attends over the cells of all slots, which measured
about 5x slower time-to-first-token with 8 interleaved sessions on SmolLM2.

Decoding is greedy and driven here token by token, so the prefill that scores a subtask is the
one its local decode continues from: no second prefill when the step stays local.

Concurrent requests share the one llama.cpp context on one engine thread. Generations run there
`decode_chunk` tokens at a time and queue again behind whatever arrived meanwhile, so other work
waits for one chunk, not for a whole local answer. A slot that is generating (or whose prompt is
being evaluated) is never recycled, continued or evicted by another request; when every slot is
taken, a new request waits for one to finish. A cancelled generation stops at its next chunk.

With `batching` (the default) concurrent generations share each llama_decode (one token of every
active sequence per call), and so do prompts: a generation's prompt and the routing prefills that
queue up meanwhile are placed in their slots and their new tokens evaluated `prefill_chunk` at a
time in the same llama_decode calls as the running generations' next tokens (chunked, so a long
prompt delays the others' next token by one chunk, not by its whole length). `n` samples of one
prompt share its KV (copied into n - 1 more slots) and decode in the same batch. Without it
(`batching=False`, the engine before) each llama_decode holds one sequence, one prompt at a time.

The package, one job per module (the way vLLM and SGLang keep cache manager, scheduler and model
runner apart), each layer importing only those below it (pyproject.toml's import-linter contract):

- `engine`: `LlamaCppEngine`, the async facade (the Engine interface, the decode loop on the event
  loop, the one engine thread);
- `scheduler`: prompts placed, evaluated in chunks and decoded in shared steps; routing prefills;
- `requests`: what the scheduler works on: a generation (`Decoding`), a prompt being evaluated;
- `kvcache`: the slots and the radix index (`SlotCache`; the KV calls passed in, so it runs
  without a model), `sampling`: greedy and sampled choice, grammars; `model`: the loaded model,
  its tokenizer and template;
- `batch`: the owning `llama_batch` and its one fill routine.
"""

from hera_core.backends.llamacpp.engine import LlamaCppEngine, Occupancy

__all__ = ["LlamaCppEngine", "Occupancy"]
