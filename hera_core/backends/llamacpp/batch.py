"""An owning `llama_batch` and the one routine that fills it (as llama-cpp-python's `_internals`
wraps it): every evaluation of the engine, one prompt, several prompts, or one token of each
running generation, is a list of spans packed into the same batch."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from hera_core.errors import HeraError


@dataclass(frozen=True)
class Span:
    """Tokens to evaluate at positions start.. of one sequence (a llama.cpp sequence id = a slot)."""

    tokens: Sequence[int]
    seq: int
    start: int


class Batch:
    """A `llama_batch` of up to `capacity` tokens, one sequence id each, owned: `close()` frees it.

    `decode` packs spans into llama_decode calls of up to `capacity` tokens (a span may be split
    across two calls) and returns, per span, the logits after its last token, or with `every_row`
    the logits after each of its tokens ([len(tokens), vocab])."""

    def __init__(self, lib, ctx, capacity: int, n_vocab: int, kv_cells: int) -> None:
        self._lib = lib  # llama_cpp (the ctypes bindings)
        self._ctx = ctx  # the llama_context pointer the batch is decoded in
        self.capacity = capacity  # tokens per llama_decode call (the context's n_batch)
        self.n_vocab = n_vocab  # length of one row of logits
        self.kv_cells = kv_cells  # cells of the context's KV cache (for the error message)
        self._raw = lib.llama_batch_init(capacity, 0, 1)

    def _fill(self, tokens: np.ndarray, seqs: np.ndarray, pos: np.ndarray, want: np.ndarray) -> None:
        raw, n = self._raw, len(tokens)
        raw.n_tokens = n
        np.ctypeslib.as_array(raw.token, shape=(n,))[:] = tokens
        np.ctypeslib.as_array(raw.pos, shape=(n,))[:] = pos
        np.ctypeslib.as_array(raw.n_seq_id, shape=(n,))[:] = 1
        np.ctypeslib.as_array(raw.logits, shape=(n,))[:] = want
        for j in range(n):  # one pointer per token: llama_batch's seq_id is an array of arrays
            raw.seq_id[j][0] = int(seqs[j])

    def decode(self, spans: list[Span], *, every_row: bool = False,
               on_full: Callable[[], None] | None = None) -> list[np.ndarray]:
        """Evaluate `spans`; `on_full`, if given, is called once when the KV cache has no room
        (llama_decode's status 1) before that call is retried."""
        if self._raw is None:
            raise HeraError("the engine is closed")
        lens = [len(s.tokens) for s in spans]
        if not sum(lens):
            return [np.empty((0, self.n_vocab), np.float32) if every_row else None for _ in spans]
        owner = np.repeat(np.arange(len(spans)), lens)  # the span of each flat token
        tokens = np.concatenate([np.asarray(s.tokens, np.int32) for s in spans if len(s.tokens)])
        seqs = np.repeat([s.seq for s in spans], lens)
        pos = np.concatenate([np.arange(s.start, s.start + n) for s, n in zip(spans, lens) if n])
        last = np.zeros(len(tokens), dtype=bool)
        last[np.cumsum(lens)[np.asarray(lens) > 0] - 1] = True
        want = np.ones(len(tokens), bool) if every_row else last
        rows: list[list[np.ndarray]] = [[] for _ in spans]
        for c in range(0, len(tokens), self.capacity):
            part = slice(c, c + self.capacity)
            self._fill(tokens[part], seqs[part], pos[part], want[part])
            self._run(len(spans), on_full)
            for j in np.flatnonzero(want[part]):
                ptr = self._lib.llama_get_logits_ith(self._ctx, int(j))
                rows[owner[c + j]].append(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy())
        if every_row:
            return [np.stack(r) if r else np.empty((0, self.n_vocab), np.float32) for r in rows]
        return [r[-1] if r else None for r in rows]

    def _run(self, n_spans: int, on_full: Callable[[], None] | None) -> None:
        rc = self._lib.llama_decode(self._ctx, self._raw)
        if rc == 1 and on_full is not None:  # no room in the KV cache (unified layout): make some, retry once
            on_full()
            rc = self._lib.llama_decode(self._ctx, self._raw)
        if rc != 0:
            raise HeraError(f"llama_decode of {n_spans} sequences failed with status {rc} (KV cache of "
                            f"{self.kv_cells} cells full?); "
                            "raise local.n_ctx or lower the number of sessions")

    def close(self) -> None:
        if self._raw is not None:
            self._lib.llama_batch_free(self._raw)
            self._raw = None
