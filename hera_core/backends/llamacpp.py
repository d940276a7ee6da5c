"""Local SLM engine on llama.cpp (llama-cpp-python's low-level bindings), the embedded default.

KV-cache reuse across agent steps and interleaved sessions, without copying states in and out:
one llama.cpp context holds up to `n_slots` sequences (llama.cpp sequence ids) whose KV stays in
place between requests. A radix index (hera_core.native.radix, native in csrc/radix.cpp) maps cached
prompt prefixes, block by block, to the slots that hold them. A new prompt goes to the slot
sharing its longest prefix and only the new tokens are evaluated:

- the next step of the same conversation continues its slot in place (the slot's last prompt is
  a prefix of the new one; only the reply and the new user turn are evaluated);
- a prompt that shares only part of a slot (a common system prompt, a branch) gets a free or
  least-recently-used slot and the shared prefix is linked into it with `llama_memory_seq_cp`;
- least-recently-used unpinned blocks are evicted (`llama_memory_seq_rm`) to stay in the budget.

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
"""

from __future__ import annotations

import asyncio
import ctypes
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hera_core.errors import HeraError, InvalidRequestError
from hera_core.native.radix import RadixIndex
from hera_core.backends.base import Engine, Generation, Message, Prefill, check_context
from hera_core.backends.tools import CLOSE, OPEN, ToolSet, parse_calls, template_messages


_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])  # llama_token_data


def _content(d: "_Decoding") -> str:
    """What may be streamed to the client as text so far: all of it, or what precedes a tool call;
    with tools offered, nothing while the answer could still be a call written without its tags
    (it starts with `{`, `[` or a code fence): that is decided when it ends."""
    if d.toolset is None:
        return d.text
    if d.done:
        return _parsed(d)[0]
    head = d.text.split(OPEN, 1)[0]
    return "" if d.toolset.choice != "none" and head.lstrip()[:1] in ("{", "[", "`") else head


def _parsed(d: "_Decoding") -> tuple:
    """The finished output of a generation with tools, split into content, calls and errors (once)."""
    if d.parsed is None:
        d.parsed = parse_calls(d.text, d.toolset)
    return d.parsed


def _sample(logits: np.ndarray, ids: np.ndarray, d: "_Decoding") -> int:
    """One token of `ids` drawn from softmax(logits / temperature), within the top_p nucleus."""
    z = logits.astype(np.float64) / d.temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if d.top_p < 1.0:
        order = np.argsort(-p)
        keep = order[: int(np.searchsorted(np.cumsum(p[order]), d.top_p)) + 1]
        p = p[keep] / p[keep].sum()
        ids = ids[keep]
    return int(ids[d.rng.choice(len(p), p=p)])


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n], dtype=np.int64) != np.asarray(b[:n], dtype=np.int64))
    return int(diff[0]) if diff.size else n


@dataclass
class _Slot:
    tokens: list[int] = field(default_factory=list)  # token ids whose KV this sequence holds (positions 0..)
    prompt_len: int = 0  # length of the last prompt evaluated here; a continuation must match it whole
    logits: np.ndarray | None = None  # logits after tokens[-1], kept only right after an evaluation
    last_used: int = 0  # logical clock, for choosing a slot to recycle
    busy: bool = False  # a generation is decoding here: not to be recycled, continued or evicted
    placing: bool = False  # a prompt placed here awaits its evaluation (a batch of prefills): likewise


def _logprob(logits: np.ndarray, token: int) -> float:
    """log softmax(logits)[token], stable."""
    top = float(logits.max())
    return float(logits[token]) - top - float(np.log(np.exp(logits - top).sum()))


class _LlgGrammar:
    """A tool-call grammar run by llguidance (tool_grammar="llguidance"): the same GBNF, in its
    Lark form, giving a mask over the whole vocabulary at each step. `specials` maps a literal of
    the grammar to the special token that spells it (the tool-call tags): llguidance matches a
    special token only where the grammar names it, never as the text of a literal."""

    def __init__(self, tokenizer, gbnf: str, n_vocab: int, specials: dict[str, int]) -> None:
        import llguidance
        from llguidance.gbnf_to_lark import gbnf_to_lark
        from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

        lark = gbnf_to_lark(gbnf)
        for text, token in specials.items():
            lark = lark.replace(f'"\\n{text}"', f'"\\n" <[{token}]>').replace(f'"{text}"', f"<[{token}]>")
        self.matcher = llguidance.LLMatcher(tokenizer, llguidance.LLMatcher.grammar_from_lark(lark), log_level=0)
        if self.matcher.is_error():
            raise InvalidRequestError(f"the tools' JSON Schemas could not be turned into a grammar: "
                                      f"{self.matcher.get_error()}")
        self._fill, self.n_vocab = fill_next_token_bitmask, n_vocab
        self._bitmask = allocate_token_bitmask(1, n_vocab)

    def allowed(self) -> np.ndarray:
        """Bool [n_vocab]: the tokens the grammar allows next."""
        self._fill(self.matcher, self._bitmask)
        return np.unpackbits(self._bitmask[0].view(np.uint8), bitorder="little")[: self.n_vocab].astype(bool)

    def accept(self, token: int) -> None:
        self.matcher.consume_token(token)


@dataclass
class _Placed:
    """A prompt given its slot, its cached prefix in place, the rest not yet evaluated."""

    slot: int
    reused: int  # tokens of the prompt already in the slot's KV
    now: int  # the logical clock when it was placed
    logits: np.ndarray | None  # set for an exact repeat (nothing to evaluate), else once evaluated
    exact: bool = False
    pinned: int = 0  # index blocks of the prefix locked until it is settled


class _NoFreeSlot(Exception):
    """Every slot is generating; the request waits for one (engine-internal)."""


@dataclass(eq=False)
class _Prompt:
    """A prompt being evaluated a chunk at a time in the shared decode steps (engine thread only):
    a generation's (it then starts decoding) or a routing prefill's (its logits then go back)."""

    tokens: list[int]
    placed: _Placed
    done: int  # tokens of the prompt in the slot's KV so far
    t0: float
    decoding: "_Decoding | None" = None
    waiter: tuple | None = None  # (messages, toolset, future) of a routing prefill


@dataclass(eq=False)
class _Decoding:
    """A generation in progress, decoded a chunk at a time on the engine thread."""

    slot: int
    logits: np.ndarray | None  # the distribution of the next token (None while the prompt is evaluated)
    max_tokens: int
    stop: list[str]
    on_text: Callable[[str], None] | None
    t0: float
    prompt_tokens: int
    reused: int
    pinned: int  # index blocks of the prompt locked against eviction while decoding
    out: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # log-probability of each token of `out`
    text: str = ""
    sent: int = 0
    finish: str = "length"
    ttft: float | None = None
    done: bool = False
    released: bool = False  # the slot has been handed back
    cancelled: bool = False  # its caller went away: drop it from the shared decode loop
    parsed: tuple | None = None  # (content, tool_calls, errors) of the finished output, parsed once
    toolset: ToolSet | None = None
    grammar: object = None  # llama.cpp grammar sampler, active while a tool call is decoded
    rng: np.random.Generator | None = None  # a sampled generation's own random stream (None: greedy)
    temperature: float = 1.0
    top_p: float = 1.0
    prompt: _Prompt | None = None  # its prompt, while still being evaluated in the shared steps
    error: BaseException | None = None  # that evaluation failed


class LlamaCppEngine(Engine):
    is_local = True

    def __init__(self, model_path: str | Path, *, name: str | None = None, n_ctx: int = 4096,
                 n_threads: int = 1, n_threads_batch: int | None = None, n_batch: int = 512,
                 n_slots: int = 8, block_size: int = 16, kv_budget_bytes: int | None = None,
                 kv_budget_tokens: int | None = None, kv_unified: bool = False, n_gpu_layers: int = -1,
                 flash_attn: bool = True, decode_chunk: int = 8, prefill_chunk: int = 256,
                 tool_grammar: bool | str = True, batching: bool = True) -> None:
        """n_ctx: the longest prompt + completion of one subtask, tokens (also each slot's size).
        n_slots: sequences kept in the KV cache at once. kv_budget_bytes: cap on the KV bytes the
        index keeps cached, counting a shared prefix block once (default: all slots' cells).
        flash_attn: llama.cpp's fused attention (faster prefill here). Set explicitly because
        llama.cpp's "auto" depends on the build, and the setting changes greedy outputs: compare
        engines only with the same setting. Even then llama.cpp's CPU kernels round differently
        for different batch splits, so a reused prefix can flip a near-tie (tests/test_kvcache.py).
        decode_chunk: tokens a generation decodes before other queued requests get the engine
        (0: the whole generation at once). batching: concurrent generations share each llama_decode
        (one token of every active sequence per call); False decodes one sequence per call, in
        turns of `decode_chunk` tokens (the engine before continuous batching). prefill_chunk: with
        batching, prompt tokens evaluated per decode step (shared with the generations' next
        tokens; 0: each prompt whole). tool_grammar: decode tool calls under the grammar of the
        tools' schemas, run by llama.cpp's grammar sampler ("llama.cpp", True) or by llguidance
        ("llguidance"); False only to measure what it buys (bench/test_tool_calls.py)."""
        import llama_cpp
        from llama_cpp import _internals as internals
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        for arg, value, low in (("n_threads", n_threads, 1), ("n_slots", n_slots, 1), ("block_size", block_size, 1),
                                ("n_ctx", n_ctx, 16), ("decode_chunk", decode_chunk, 0),
                                ("prefill_chunk", prefill_chunk, 0)):
            if value < low:
                raise InvalidRequestError(f"{arg} must be >= {low}, got {value}")
        if n_slots > 64:
            raise InvalidRequestError(f"n_slots must be <= 64, got {n_slots}")
        self._lib = llama_cpp
        llama_cpp.llama_backend_init()
        from llama_cpp import _logger

        _logger.set_verbose(False)  # llama.cpp's load and graph logs are noise here
        self.name = name or Path(model_path).stem
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = n_gpu_layers  # a CUDA build (Jetson) offloads; a CPU build ignores it
        self._model = internals.LlamaModel(path_model=str(model_path), params=mparams, verbose=False)
        self.n_ctx = n_ctx
        self.kv_cells = n_slots * n_ctx
        self.kv_unified = kv_unified
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = self.kv_cells
        cparams.n_batch = n_batch
        cparams.n_ubatch = min(n_batch, 512)
        cparams.n_seq_max = n_slots
        cparams.kv_unified = kv_unified
        cparams.flash_attn_type = 1 if flash_attn else 0  # explicit: "auto" may differ by build
        cparams.n_threads = n_threads
        cparams.n_threads_batch = n_threads_batch or n_threads
        self._ctx = internals.LlamaContext(model=self._model, params=cparams, verbose=False)
        self._mem = llama_cpp.llama_get_memory(self._ctx.ctx)
        self._vocab = llama_cpp.llama_model_get_vocab(self._model.model)
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self.n_batch = n_batch
        self.n_vocab = self._model.n_vocab()
        self.decode_chunk = decode_chunk
        self.prefill_chunk = prefill_chunk
        if tool_grammar not in (True, False, "llama.cpp", "llguidance"):
            raise InvalidRequestError(f"tool_grammar must be 'llama.cpp', 'llguidance' or False, got {tool_grammar!r}")
        self.tool_grammar = "llama.cpp" if tool_grammar is True else tool_grammar
        self._llg_tokenizer = None
        self.batching = batching
        self._active: list[tuple[_Decoding, asyncio.Future]] = []  # generations in the shared decode loop
        # Routing prefills waiting for the engine thread; the next job there takes all of them.
        self._prefills: list[tuple[list[Message], ToolSet | None, asyncio.Future]] = []
        self._prefill_job = None
        self._prefill_lock = threading.Lock()  # the queue is filled on event loops, drained on the engine thread
        self._riding = False  # a decode loop runs: its steps take the queued prefills
        self._prompts: list[_Prompt] = []  # prompts evaluated chunk by chunk (engine thread only), first come first
        self._decoder: asyncio.Task | None = None

        meta = self._model.metadata()
        template = meta.get("tokenizer.chat_template")
        if not template:
            raise InvalidRequestError(f"model {self.name} has no chat template; use an instruct model")
        eos, bos = self._model.token_eos(), self._model.token_bos()
        self._formatter = Jinja2ChatFormatter(template=template, eos_token=self._model.token_get_text(eos),
                                              bos_token=self._model.token_get_text(bos) if bos != -1 else "")
        # The token that opens a tool call in the Hermes/Qwen format, where the vocabulary has one
        # (auto tool choice switches the grammar on when the model emits it).
        opener = self._model.tokenize(OPEN.encode(), add_bos=False, special=True)
        self._open_token = opener[0] if len(opener) == 1 else None
        closer = self._model.tokenize(CLOSE.encode(), add_bos=False, special=True)
        self._close_token = closer[0] if len(closer) == 1 else None

        # KV bytes per token (f16 K and V over all layers), for the index's byte accounting.
        n_layer = llama_cpp.llama_model_n_layer(self._model.model)
        head_dim = llama_cpp.llama_model_n_embd(self._model.model) // llama_cpp.llama_model_n_head(self._model.model)
        self.kv_bytes_per_token = 2 * 2 * n_layer * llama_cpp.llama_model_n_head_kv(self._model.model) * head_dim
        # Slack for each slot's partial last block, which the block-granular index does not count.
        budget_cap = (self.kv_cells - n_slots * block_size) * self.kv_bytes_per_token
        if kv_budget_tokens is not None:
            kv_budget_bytes = kv_budget_tokens * self.kv_bytes_per_token
        budget = min(kv_budget_bytes, budget_cap) if kv_budget_bytes is not None else budget_cap
        self._index = RadixIndex(block_size, self.kv_bytes_per_token, budget, n_slots)
        self._slots = [_Slot() for _ in range(n_slots)]
        self._clock = 0
        # One worker thread: a llama.cpp context is not thread-safe, and calls queue in order.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"hera-{self.name}")
        self.stats = {"prefill_tokens": 0, "reused_tokens": 0, "generated_tokens": 0, "seq_copies": 0,
                      "decode_steps": 0, "batched_sequences": 0,  # generation decodes; sequences in them
                      "prefill_batches": 0, "batched_prefills": 0,  # prompt evaluations of several requests
                      "prefills_with_decodes": 0,  # routing prefills evaluated in a generation's decode
                      "prompt_chunks": 0, "prompts_with_decodes": 0}  # generations' prompt chunks; with decodes

    # --- tokens -------------------------------------------------------------------------------
    def tokenize_messages(self, messages: list[Message], toolset: ToolSet | None = None) -> list[int]:
        """The chat as the model's template renders it; offered tools go in the template's tools
        section (none with tool_choice "none": the model is not to call any)."""
        if not messages:
            raise InvalidRequestError("messages must not be empty")
        tools = list(toolset.tools) if toolset is not None and toolset.choice != "none" else None
        try:
            prompt = self._formatter(messages=template_messages(messages), tools=tools).prompt
        except Exception as exc:  # jinja raises for roles the template does not accept
            raise InvalidRequestError(f"cannot format messages with the model's chat template: {exc}") from exc
        return self._model.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)

    def detokenize(self, tokens: list[int]) -> str:
        return self._model.detokenize(tokens, special=False).decode("utf-8", errors="ignore")

    def _check_fits(self, tokens: list[int]) -> None:
        check_context(len(tokens), self.n_ctx)

    def cache_stats(self) -> dict[str, float]:
        seen = self.stats["prefill_tokens"] + self.stats["reused_tokens"]
        return {**self.stats, "hit_rate": self.stats["reused_tokens"] / seen if seen else 0.0,
                "bytes_held": self._index.bytes_held, "evictions": self._index.evictions}

    # --- KV bookkeeping (engine thread only) ----------------------------------------------------
    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _seq_rm(self, slot: int, start: int) -> None:
        self._lib.llama_memory_seq_rm(self._mem, slot, start, -1)
        s = self._slots[slot]
        if start < len(s.tokens):
            s.tokens = s.tokens[:start]
            s.logits = None
        s.prompt_len = min(s.prompt_len, start)

    def _apply_evictions(self, evicted) -> None:
        for slot, start, _n in evicted:
            self._seq_rm(slot, start)

    def _recycle_slot(self, exclude: int) -> int:
        """An empty slot, else the least recently used idle one (emptied); _NoFreeSlot if none."""
        idle = [i for i, s in enumerate(self._slots) if not (s.busy or s.placing) and i != exclude]
        if not idle:
            raise _NoFreeSlot
        free = [i for i in idle if not self._slots[i].tokens]
        slot = free[0] if free else min(idle, key=lambda i: self._slots[i].last_used)
        self._index.truncate(slot, 0)
        self._seq_rm(slot, 0)
        return slot

    def _decode(self, tokens: list[int], slot: int, start: int, all_logits: bool = False) -> np.ndarray:
        """Evaluate `tokens` at positions start.. of sequence `slot`; logits of the last one
        (`all_logits`: [len(tokens), vocab], one row per token)."""
        rows: list[np.ndarray] = []
        lib, batch = self._lib, self._batch
        for i in range(0, len(tokens), self.n_batch):
            chunk = tokens[i:i + self.n_batch]
            n = len(chunk)
            batch.n_tokens = n
            np.ctypeslib.as_array(batch.token, shape=(n,))[:] = chunk
            np.ctypeslib.as_array(batch.pos, shape=(n,))[:] = np.arange(start + i, start + i + n)
            np.ctypeslib.as_array(batch.n_seq_id, shape=(n,))[:] = 1
            logits_flags = np.ctypeslib.as_array(batch.logits, shape=(n,))
            logits_flags[:] = 1 if all_logits else 0
            logits_flags[n - 1] = 1
            for j in range(n):
                batch.seq_id[j][0] = slot
            rc = lib.llama_decode(self._ctx.ctx, batch)
            if rc == 1:  # no room in the KV cache (unified layout): drop every unpinned block, retry once
                self._apply_evictions(self._index.evict(self._index.bytes_held))
                rc = lib.llama_decode(self._ctx.ctx, batch)
            if rc != 0:
                raise HeraError(f"llama_decode failed with status {rc} (KV cache of {self.kv_cells} cells full?); "
                                "raise local.n_ctx or lower the number of sessions")
            if all_logits:
                ptr = lib.llama_get_logits(self._ctx.ctx)
                rows.append(np.ctypeslib.as_array(ptr, shape=(n, self.n_vocab)).copy())
        if all_logits:
            return np.concatenate(rows) if rows else np.empty((0, self.n_vocab), np.float32)
        ptr = lib.llama_get_logits_ith(self._ctx.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def _eval_prompt(self, tokens: list[int], reserve: int = 0) -> tuple[int, np.ndarray, int]:
        """Bring some slot's KV to `tokens`, evaluating only what is not cached.

        Returns (slot, logits after the last token, tokens reused). `reserve` is room to keep for
        the completion. A generating slot can lend its prefix (copied) but is never taken over.
        """
        placed = self._place_prompt(tokens, reserve)
        if placed.logits is None:
            try:
                placed.logits = self._decode(tokens[placed.reused:], placed.slot, placed.reused)
            except BaseException:
                self._unplace(placed, tokens)
                raise
        self._settle_prompt(placed, tokens)
        return placed.slot, placed.logits, placed.reused

    def _place_prompt(self, tokens: list[int], reserve: int = 0) -> "_Placed":
        """Choose the slot for `tokens` and bring it to their longest cached prefix (linked from
        another slot if need be), with room made for the rest; nothing is evaluated. The prefix is
        locked against eviction until `_settle_prompt`. An exact repeat comes back with its logits."""
        self._check_fits(tokens)
        now = self._tick()
        self._index.match(np.asarray(tokens, dtype=np.int32))  # marks the cached path recently used
        holder, m, exact = -1, 0, False
        for i, slot_i in enumerate(self._slots):  # a handful of slots: an exact scan is cheap
            if not slot_i.tokens:
                continue
            mi = _common_prefix(slot_i.tokens, tokens)
            ex = (mi == len(tokens) == len(slot_i.tokens) and slot_i.logits is not None
                  and not slot_i.busy and not slot_i.placing)
            if (ex, mi, slot_i.last_used) > (exact, m, self._slots[holder].last_used if holder >= 0 else -1):
                holder, m, exact = i, mi, ex
        if exact:
            self._slots[holder].last_used = now
            return _Placed(holder, m, now, self._slots[holder].logits, exact=True)  # just evaluated here
        if holder >= 0 and m > 0:
            m = min(m, len(tokens) - 1)  # evaluate at least one token, to get its logits
            held = self._slots[holder]
            if not (held.busy or held.placing) and (m + 1 >= held.prompt_len or len(self._slots) == 1):
                # the same conversation one step on (or a retry), or nowhere else to go: in place
                slot = holder
            else:  # a shared prefix of another conversation: link it into a slot of its own
                slot = self._recycle_slot(exclude=holder)
                if self.kv_unified:  # tag the shared cells with the new sequence id
                    self._lib.llama_memory_seq_cp(self._mem, holder, slot, 0, m)
                else:  # across streams llama.cpp copies the whole source stream; cut it at m below
                    self._lib.llama_memory_seq_cp(self._mem, holder, slot, -1, -1)
                self._slots[slot].tokens = list(tokens[:m])
                self._index.insert(np.asarray(tokens[:m], dtype=np.int32), slot)
                self.stats["seq_copies"] += 1
        else:
            m = 0
            slot = self._recycle_slot(exclude=-1)
        self._index.truncate(slot, m)
        self._seq_rm(slot, m)
        # Make room for the new tokens (and the completion) without touching this prompt's prefix.
        key = np.asarray(tokens[:m], dtype=np.int32)
        pinned = self._index.lock(key)
        need = (len(tokens) - m + reserve) * self.kv_bytes_per_token
        over = self._index.bytes_held + need - self._index.byte_budget
        if over > 0:
            try:
                self._apply_evictions(self._index.evict(over))
            except BaseException:
                self._index.release(key, pinned)
                raise
        s = self._slots[slot]
        s.last_used, s.logits = now, None
        s.placing = True  # until settled: another prompt of the same batch must not take this slot
        return _Placed(slot, m, now, None, pinned=pinned)

    def _settle_prompt(self, placed: "_Placed", tokens: list[int]) -> None:
        """The slot now holds `tokens` (evaluated): record it, index it, unlock the prefix."""
        if placed.exact:
            self.stats["reused_tokens"] += placed.reused
            return
        s = self._slots[placed.slot]
        s.tokens, s.prompt_len, s.logits, s.last_used = list(tokens), len(tokens), placed.logits, placed.now
        s.placing = False
        self._index.release(np.asarray(tokens[:placed.reused], dtype=np.int32), placed.pinned)
        self._apply_evictions(self._index.insert(np.asarray(tokens, dtype=np.int32), placed.slot))
        self.stats["prefill_tokens"] += len(tokens) - placed.reused
        self.stats["reused_tokens"] += placed.reused

    def _unplace(self, placed: "_Placed", tokens: list[int]) -> None:
        """A placed prompt that will not be evaluated (its batch failed): the slot keeps its prefix."""
        if not placed.exact:
            self._slots[placed.slot].placing = False
            self._index.release(np.asarray(tokens[:placed.reused], dtype=np.int32), placed.pinned)

    def _decode_prompts(self, items: list[tuple[list[int], int, int]]) -> list[np.ndarray]:
        """Evaluate several prompts' new tokens, (tokens, sequence, start position) each, packed
        together into llama_decode calls of up to n_batch tokens (a prompt may span two calls);
        the logits after each prompt's last token. One prompt is exactly `_decode`."""
        if len(items) == 1:
            tokens, slot, start = items[0]
            return [self._decode(tokens, slot, start)]
        lib, batch = self._lib, self._batch
        flat = [(tok, slot, start + j, j == len(tokens) - 1, i)
                for i, (tokens, slot, start) in enumerate(items) for j, tok in enumerate(tokens)]
        out: list[np.ndarray | None] = [None] * len(items)
        for c in range(0, len(flat), self.n_batch):
            chunk = flat[c:c + self.n_batch]
            n = len(chunk)
            batch.n_tokens = n
            np.ctypeslib.as_array(batch.token, shape=(n,))[:] = [t for t, *_ in chunk]
            np.ctypeslib.as_array(batch.pos, shape=(n,))[:] = [p for _, _, p, _, _ in chunk]
            np.ctypeslib.as_array(batch.n_seq_id, shape=(n,))[:] = 1
            np.ctypeslib.as_array(batch.logits, shape=(n,))[:] = [last for *_, last, _ in chunk]
            for j, (_, slot, _, _, _) in enumerate(chunk):
                batch.seq_id[j][0] = slot
            rc = lib.llama_decode(self._ctx.ctx, batch)
            if rc != 0:
                raise HeraError(f"llama_decode of {len(items)} prompts failed with status {rc} (KV cache of "
                                f"{self.kv_cells} cells full?); raise local.n_ctx or lower the number of sessions")
            for j, (_, _, _, last, i) in enumerate(chunk):
                if last:
                    ptr = lib.llama_get_logits_ith(self._ctx.ctx, j)
                    out[i] = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()
        return out

    # --- blocking work, on the engine thread ----------------------------------------------------
    def _score_sync(self, messages: list[Message], text: str) -> list[float]:
        """Teacher-forced: the log-probability of each token of `text` as the answer to `messages`
        (one batched evaluation, logits at every position)."""
        prompt = self.tokenize_messages(messages)
        cont = self._model.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        if not cont:
            return []
        self._check_fits(prompt + cont)
        slot, logits, _ = self._eval_prompt(prompt, reserve=len(cont))
        out = [_logprob(logits, cont[0])]
        if len(cont) > 1:
            rows = self._decode(cont[:-1], slot, len(prompt), all_logits=True)
            out += [_logprob(row, tok) for row, tok in zip(rows, cont[1:])]
            s = self._slots[slot]  # the slot now holds the prompt and the continuation
            s.tokens.extend(cont[:-1])
            s.logits = None
            self._apply_evictions(self._index.insert(np.asarray(s.tokens, dtype=np.int32), slot))
        return out

    def _prefill_sync(self, messages: list[Message], toolset: ToolSet | None = None) -> Prefill:
        t0 = time.perf_counter()
        tokens = self.tokenize_messages(messages, toolset)
        _, logits, reused = self._eval_prompt(tokens)
        return Prefill(logits=logits, prompt_tokens=len(tokens), cached_tokens=reused,
                       latency_s=time.perf_counter() - t0)

    def _begin(self, messages: list[Message], max_tokens: int, stop: list[str],
               on_text: Callable[[str], None] | None, toolset: ToolSet | None = None) -> _Decoding:
        """Place the prompt in a slot (its cached prefix kept or linked) for a new generation. What is
        left to evaluate waits in `_prompts` for the shared decode steps; an exact repeat of the
        slot's last prompt claims it at once."""
        t0 = time.perf_counter()
        tokens = self.tokenize_messages(messages, toolset)
        grammar = None
        if toolset is not None and toolset.choice in ("required", "function") and self.tool_grammar:
            grammar = self._grammar_sampler(toolset, opened=False)  # the answer must be a call
        max_tokens = max(0, min(max_tokens, self.n_ctx - len(tokens)))
        try:
            placed = self._place_prompt(tokens, reserve=max_tokens)
        except BaseException:
            if grammar is not None and not isinstance(grammar, _LlgGrammar):
                self._lib.llama_sampler_free(grammar)
            raise
        d = _Decoding(slot=placed.slot, logits=None, max_tokens=max_tokens, stop=stop, on_text=on_text, t0=t0,
                      prompt_tokens=len(tokens), reused=placed.reused, pinned=0, toolset=toolset, grammar=grammar)
        if placed.logits is not None:
            self._claim(d, placed, tokens)
        else:
            d.prompt = _Prompt(tokens, placed, placed.reused, t0, decoding=d)
            self._prompts.append(d.prompt)
        return d

    def _claim(self, d: _Decoding, placed: _Placed, tokens: list[int]) -> None:
        """`d`'s prompt is evaluated: settle it and claim the slot for decoding."""
        self._settle_prompt(placed, tokens)
        self._slots[d.slot].busy = True
        d.pinned = self._index.lock(np.asarray(tokens, dtype=np.int32))
        d.logits, d.prompt = placed.logits, None

    def _start(self, messages: list[Message], max_tokens: int, stop: list[str],
               on_text: Callable[[str], None] | None, toolset: ToolSet | None = None) -> _Decoding:
        """Evaluate the prompt into a slot, whole, and claim it for this generation."""
        d = self._begin(messages, max_tokens, stop, on_text, toolset)
        if d.prompt is not None:
            self._evaluate([], [(d.prompt, len(d.prompt.tokens) - d.prompt.done)])
        return d

    def _start_samples(self, messages: list[Message], n: int, max_tokens: int, stop: list[str],
                       toolset: ToolSet | None, temperature: float, top_p: float,
                       seed: int | None) -> list[_Decoding]:
        """`n` sampled generations of one prompt: evaluated once, its KV copied into n - 1 more
        slots (llama_memory_seq_cp, no recomputation), each with its own random stream."""
        first = self._start(messages, max_tokens, stop, None, toolset)
        ds = [first]
        try:
            for _ in range(n - 1):
                slot = self._recycle_slot(exclude=first.slot)
                self._lib.llama_memory_seq_cp(self._mem, first.slot, slot, -1, -1)
                src, s = self._slots[first.slot], self._slots[slot]
                s.tokens, s.prompt_len, s.logits, s.busy = list(src.tokens), src.prompt_len, src.logits, True
                s.last_used = self._tick()
                key = np.asarray(s.tokens, dtype=np.int32)
                self._apply_evictions(self._index.insert(key, slot))
                self.stats["seq_copies"] += 1
                grammar = self._grammar_sampler(toolset, opened=False) if first.grammar is not None else None
                ds.append(_Decoding(slot=slot, logits=first.logits, max_tokens=first.max_tokens, stop=stop,
                                    on_text=None, t0=first.t0, prompt_tokens=first.prompt_tokens,
                                    reused=first.prompt_tokens, pinned=self._index.lock(key), toolset=toolset,
                                    grammar=grammar))
        except BaseException:
            for d in ds:  # not enough idle slots yet (or a failure): hand back what was claimed
                self._release(d)
            raise
        seeds = np.random.SeedSequence(seed).spawn(n)
        for d, ss in zip(ds, seeds):
            d.rng, d.temperature, d.top_p = np.random.default_rng(ss), temperature, top_p
        return ds

    # --- tool calls: a grammar from the tools' schemas, switched on when a call starts ------------
    def _grammar_sampler(self, toolset: ToolSet, opened: bool):
        grammar = toolset.grammar(opened)
        if self.tool_grammar == "llguidance":
            if self._llg_tokenizer is None:  # about a second, once per engine
                from llguidance.llamacpp import lltokenizer_from_vocab

                # Every end-of-generation token ends a call (Qwen ends a turn with <|im_end|>, not its EOS).
                eog = [t for t in range(self.n_vocab) if self._lib.llama_vocab_is_eog(self._vocab, t)]
                self._llg_tokenizer = lltokenizer_from_vocab(self._vocab, n_vocab=self.n_vocab, eos_token=eog)
            specials = {tag: tok for tag, tok in ((OPEN, self._open_token), (CLOSE, self._close_token)) if tok is not None}
            return _LlgGrammar(self._llg_tokenizer, grammar, self.n_vocab, specials)
        sampler = self._lib.llama_sampler_init_grammar(self._vocab, grammar.encode(), b"root")
        if not sampler:
            raise InvalidRequestError("the tools' JSON Schemas could not be turned into a grammar")
        return sampler

    def _choose(self, d: _Decoding) -> int:
        """The next token: greedy; under the tool-call grammar, greedy among the tokens it allows
        (checked on the 64 likeliest first, the whole vocabulary only if none of those fits)."""
        if d.grammar is None:
            logits = d.logits
            if d.toolset is not None and d.toolset.choice == "none" and self._open_token is not None:
                logits = d.logits.copy()  # (the slot may keep these logits for an exact repeat)
                logits[self._open_token] = -np.inf  # no call when the client said none
            if d.rng is not None:
                return _sample(logits, np.arange(len(logits)), d)
            return int(np.argmax(logits))
        if isinstance(d.grammar, _LlgGrammar):
            ok = d.grammar.allowed()
            if not ok.any():
                raise HeraError("the tool-call grammar allows no token")
            if d.rng is not None:
                return _sample(d.logits[ok], np.flatnonzero(ok), d)
            return int(np.argmax(np.where(ok, d.logits, -np.inf)))
        lib = self._lib
        top = np.argpartition(d.logits, -64)[-64:]
        for ids in (top[np.argsort(-d.logits[top])], np.argsort(-d.logits)):
            cand = np.zeros(len(ids), dtype=_TOKEN_DATA)
            cand["id"], cand["logit"] = ids, d.logits[ids]
            arr = lib.llama_token_data_array(data=cand.ctypes.data_as(lib.llama_token_data_p), size=len(ids),
                                             selected=-1, sorted=True)
            lib.llama_sampler_apply(d.grammar, ctypes.byref(arr))
            allowed = np.flatnonzero(np.isfinite(cand["logit"]))
            if len(allowed) and d.rng is not None:
                return _sample(cand["logit"][allowed], cand["id"][allowed], d)
            if len(allowed):
                return int(cand["id"][allowed[0]])
        raise HeraError("the tool-call grammar allows no token")

    def _advance(self, d: _Decoding) -> int | None:
        """Pick `d`'s next token from its current logits and account for it (text, stop strings,
        streaming, the tool-call grammar). Returns the token to evaluate next, or None once `d`
        is done (end of generation, a stop string, max_tokens)."""
        if len(d.out) >= d.max_tokens:
            d.done = True
            return None
        token = self._choose(d)  # greedy (under the tool-call grammar, if one is on): reproducible, cacheable
        if d.ttft is None:
            d.ttft = time.perf_counter() - d.t0
        if self._lib.llama_vocab_is_eog(self._vocab, token):
            d.finish, d.done = "stop", True
            return None
        d.out.append(token)
        d.logprobs.append(_logprob(d.logits, token))  # the draft checks' token-level confidence
        if isinstance(d.grammar, _LlgGrammar):
            d.grammar.accept(token)
        elif d.grammar is not None:
            self._lib.llama_sampler_accept(d.grammar, token)
        elif d.toolset is not None and d.toolset.choice == "auto" and token == self._open_token and self.tool_grammar:
            d.grammar = self._grammar_sampler(d.toolset, opened=True)  # the model chose to call a tool
        d.text = self.detokenize(d.out)
        content = _content(d)
        hits = [content.index(x) for x in d.stop if x in content]
        if hits and len(content) == len(d.text):
            d.text, d.finish, d.done = d.text[: min(hits)], "stop", True
            return None
        holdback = max((len(x) for x in d.stop), default=1) - 1  # what could still become a stop string
        if d.on_text is not None and len(content) - holdback > d.sent:
            d.on_text(content[d.sent: len(content) - holdback])
            d.sent = len(content) - holdback
        if len(d.out) == d.max_tokens:
            d.done = True
            return None
        return token

    def _step(self, d: _Decoding) -> bool:
        """Decode up to `decode_chunk` tokens of `d` alone (all of it when 0); True once it is done."""
        return self._step_batch([d], self.decode_chunk or d.max_tokens)

    def _step_batch(self, ds: list[_Decoding], steps: int) -> bool:
        """Up to `steps` tokens of every generation in `ds`, each step one llama_decode over all of
        them (one token per sequence, each at its own position of its own slot): decoding reads
        the weights once for the whole batch. Prompts waiting in `_prompts` (new generations',
        routing prefills queued meanwhile) ride along, `prefill_chunk` tokens per step. Finished
        generations are released. True once all of `ds` are done."""
        for _ in range(steps):
            if self._riding:  # with decode_chunk 0 a generation keeps the engine to its end: they wait
                self._admit_prefills()
            stepping = [(d, tok) for d in ds
                        if d.prompt is None and not d.done and (tok := self._advance(d)) is not None]
            chunks = self._prompt_chunks(self.prefill_chunk)
            if not stepping and not chunks:
                break
            if stepping:
                self.stats["decode_steps"] += 1
                self.stats["batched_sequences"] += len(stepping)
            items = [([tok], d.slot, len(self._slots[d.slot].tokens)) for d, tok in stepping]
            rows = self._evaluate(items, chunks)
            for (d, tok), logits in zip(stepping, rows):
                s = self._slots[d.slot]
                s.tokens.append(tok)
                s.logits = d.logits = logits
        for d in ds:
            if d.done and not d.released:
                self._finish(d)
        return all(d.done for d in ds)

    # --- prompts evaluated in the shared steps ----------------------------------------------------
    def _prompt_chunks(self, budget: int) -> list[tuple[_Prompt, int]]:
        """The next tokens of the waiting prompts, first come first, `budget` in all (0: all)."""
        out, left = [], budget or float("inf")
        for p in self._prompts:
            if left <= 0:
                break
            n = int(min(len(p.tokens) - p.done, left))
            out.append((p, n))
            left -= n
        return out

    def _evaluate(self, items: list[tuple[list[int], int, int]],
                  chunks: list[tuple[_Prompt, int]]) -> list[np.ndarray]:
        """One step's evaluation: `items` (tokens, sequence, position; the generations' next
        tokens) and the prompts' `chunks`, packed into shared llama_decode calls. A prompt whose
        last token is in is ready: its generation may decode, its prefill goes back. Returns the
        logits after each item."""
        work = [(p.tokens[p.done:p.done + n], p.placed.slot, p.done) for p, n in chunks]
        try:
            rows = self._decode_prompts(items + work) if items or work else []
        except BaseException as exc:
            for p, _ in chunks:
                self._fail_prompt(p, exc)
            raise
        if chunks:
            routing = sum(p.waiter is not None for p, _ in chunks)
            self.stats["prompt_chunks"] += len(chunks) - routing
            if items:
                self.stats["prefills_with_decodes"] += routing
                self.stats["prompts_with_decodes"] += len(chunks) - routing
            if len(items) + len(chunks) > 1:
                self.stats["prefill_batches"] += 1
                self.stats["batched_prefills"] += len(chunks)
        ready: list[tuple[tuple, object]] = []
        for (p, n), row in zip(chunks, rows[len(items):]):
            p.done += n
            if p.done < len(p.tokens):
                continue
            self._prompts.remove(p)
            p.placed.logits = row
            if p.decoding is not None:
                self._claim(p.decoding, p.placed, p.tokens)
            else:
                self._settle_prompt(p.placed, p.tokens)
                ready.append((p.waiter, Prefill(logits=row, prompt_tokens=len(p.tokens), cached_tokens=p.placed.reused,
                                                latency_s=time.perf_counter() - p.t0)))
        if ready:
            self._deliver([w for w, _ in ready], [r for _, r in ready])
        return rows[:len(items)]

    def _drop_prompt(self, p: _Prompt) -> None:
        """A prompt that will not be finished: its slot keeps the cached prefix only."""
        if p in self._prompts:
            self._prompts.remove(p)
        self._unplace(p.placed, p.tokens)
        self._seq_rm(p.placed.slot, p.placed.reused)  # what was evaluated of it

    def _fail_prompt(self, p: _Prompt, exc: BaseException) -> None:
        """Its evaluation failed: the caller hears why."""
        if p.decoding is not None:
            d = p.decoding
            d.error, d.done = exc, True
            self._release(d)
        else:
            self._drop_prompt(p)
            self._deliver([p.waiter], [exc])

    def _admit_prefills(self) -> None:
        """Place the routing prefills queued so far; what they leave to evaluate joins `_prompts`
        (a bad request, or an exact repeat, is answered at once)."""
        answered: list[tuple[tuple, object]] = []
        for waiter in self._take_prefills():
            messages, toolset, _ = waiter
            t0 = time.perf_counter()
            try:
                tokens = self.tokenize_messages(messages, toolset)
                placed = self._place_prompt(tokens)
            except Exception as exc:  # noqa: BLE001 - handed to that request's caller
                answered.append((waiter, exc))
                continue
            if placed.logits is not None:  # an exact repeat: nothing to evaluate
                self._settle_prompt(placed, tokens)
                answered.append((waiter, Prefill(logits=placed.logits, prompt_tokens=len(tokens),
                                                 cached_tokens=placed.reused, latency_s=time.perf_counter() - t0)))
            else:
                self._prompts.append(_Prompt(tokens, placed, placed.reused, t0, waiter=waiter))
        if answered:
            self._deliver([w for w, _ in answered], [r for _, r in answered])

    def _decode_many(self, items: list[tuple[int, int, int]]) -> list[np.ndarray]:
        """One llama_decode of (token, sequence, position) items, one token per sequence; the
        logits after each. A single item is exactly `_decode` of one token."""
        if len(items) == 1:
            token, slot, pos = items[0]
            return [self._decode([token], slot, pos)]
        lib, batch, n = self._lib, self._batch, len(items)
        batch.n_tokens = n
        np.ctypeslib.as_array(batch.token, shape=(n,))[:] = [t for t, _, _ in items]
        np.ctypeslib.as_array(batch.pos, shape=(n,))[:] = [p for _, _, p in items]
        np.ctypeslib.as_array(batch.n_seq_id, shape=(n,))[:] = 1
        np.ctypeslib.as_array(batch.logits, shape=(n,))[:] = 1
        for j, (_, slot, _) in enumerate(items):
            batch.seq_id[j][0] = slot
        rc = lib.llama_decode(self._ctx.ctx, batch)
        if rc != 0:
            raise HeraError(f"llama_decode of {n} sequences failed with status {rc}; lower the number of sessions")
        ptr = lib.llama_get_logits(self._ctx.ctx)
        return list(np.ctypeslib.as_array(ptr, shape=(n, self.n_vocab)).copy())

    def _finish(self, d: _Decoding) -> None:
        """Flush the text held back, then hand the slot back."""
        content = _content(d)
        if d.on_text is not None and len(content) > d.sent:
            d.on_text(content[d.sent:])
            d.sent = len(content)
        self._release(d)

    def _release(self, d: _Decoding) -> None:
        """Unpin the prompt, free the slot and index what it now holds (prompt + decoded tokens).
        Once per generation: a late second call must not free a slot another one claimed since."""
        s = self._slots[d.slot]
        if d.grammar is not None:
            if not isinstance(d.grammar, _LlgGrammar):
                self._lib.llama_sampler_free(d.grammar)
            d.grammar = None
        if d.prompt is not None:  # released before its prompt was in: the slot was never claimed
            p, d.prompt = d.prompt, None
            self._drop_prompt(p)
            d.released = True
            return
        if not d.released:
            d.released, s.busy = True, False
            self._index.release(np.asarray(s.tokens[: d.prompt_tokens], dtype=np.int32), d.pinned)
            self._apply_evictions(self._index.insert(np.asarray(s.tokens, dtype=np.int32), d.slot))
            self.stats["generated_tokens"] += len(d.out)

    def _generation(self, d: _Decoding) -> Generation:
        latency = time.perf_counter() - d.t0
        text, calls, errors, finish = d.text, [], [], d.finish
        if d.toolset is not None:
            text, calls, errors = _parsed(d)
            finish = "tool_calls" if calls and not errors else finish
        return Generation(text=text, prompt_tokens=d.prompt_tokens, completion_tokens=len(d.out),
                          latency_s=latency, ttft_s=d.ttft if d.ttft is not None else latency,
                          finish_reason=finish, cached_tokens=d.reused, model=self.name,
                          extra={"token_logprobs": d.logprobs}, tool_calls=calls, tool_errors=errors)

    # --- async interface ------------------------------------------------------------------------
    def _release_later(self, d: _Decoding) -> None:
        """Free `d`'s slot on the engine thread, after the work queued before it (any thread)."""
        try:
            self._executor.submit(self._release, d)
        except RuntimeError:  # the engine is closing: nothing left to free
            pass

    async def _on_engine(self, fn, *args, if_abandoned: Callable[[object], None] | None = None):
        """Run `fn` on the engine thread. If the caller is cancelled while `fn` already runs there
        (it cannot be stopped), `if_abandoned` gets its result once it ends."""
        job = self._executor.submit(fn, *args)
        try:
            return await asyncio.wrap_future(job)
        except asyncio.CancelledError:
            if if_abandoned is not None and not job.cancelled():
                job.add_done_callback(lambda j: None if j.cancelled() or j.exception() is not None
                                      else if_abandoned(j.result()))
            raise

    async def _when_a_slot_is_free(self, fn, *args, if_abandoned: Callable[[object], None] | None = None):
        """Run `fn` on the engine thread; while every slot is generating, wait for one."""
        while True:
            try:
                return await self._on_engine(fn, *args, if_abandoned=if_abandoned)
            except _NoFreeSlot:
                await asyncio.sleep(0.005)  # a chunk of some generation, at most, until one ends

    async def prefill(self, messages: list[Message], *, toolset: ToolSet | None = None) -> Prefill:
        """The prompt's last-position logits. Prefills that wait for the engine thread together (as
        concurrent requests do behind a decode chunk) are evaluated together, in one batch."""
        if not self.batching:
            return await self._when_a_slot_is_free(self._prefill_sync, messages, toolset)
        while True:
            fut = asyncio.get_running_loop().create_future()
            with self._prefill_lock:
                self._prefills.append((messages, toolset, fut))
                if self._prefill_job is None and not self._riding:  # else the next decode chunk takes it
                    self._prefill_job = self._executor.submit(self._drain_prefills)
            try:
                return await fut
            except _NoFreeSlot:
                await asyncio.sleep(0.005)  # a chunk of some generation, at most, until one ends

    def _take_prefills(self) -> list[tuple[list[Message], ToolSet | None, asyncio.Future]]:
        """The routing prefills queued so far (engine thread). A drain job already queued for
        them finds nothing left and only clears its flag."""
        with self._prefill_lock:
            taken, self._prefills = self._prefills, []
        return [t for t in taken if not t[2].cancelled()]

    def _drain_prefills(self) -> None:
        """On the engine thread, no decode loop running: every routing prefill queued so far, and
        any prompt a loop left unfinished, evaluated whole in one batch."""
        with self._prefill_lock:
            self._prefill_job = None
        self._admit_prefills()
        if self._prompts:
            try:
                self._evaluate([], self._prompt_chunks(0))
            except Exception:  # noqa: BLE001 - each caller has heard why
                pass

    @staticmethod
    def _deliver(taken: list[tuple[list[Message], ToolSet | None, asyncio.Future]], results: list[object]) -> None:
        """Each prefill's result back to its caller's event loop: one callback per loop, so the
        callers of one batch resume in the same turn (and are scored together)."""
        def deliver(batch: list[tuple[asyncio.Future, object]]) -> None:
            for fut, result in batch:
                if fut.done():
                    continue
                if isinstance(result, BaseException):
                    fut.set_exception(result)
                else:
                    fut.set_result(result)

        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for (_, _, fut), result in zip(taken, results):
            by_loop.setdefault(fut.get_loop(), []).append((fut, result))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(deliver, batch)
            except RuntimeError:  # that caller's event loop is closed: nobody waits for it
                pass

    async def score_continuation(self, messages: list[Message], text: str) -> list[float]:
        """Log-probability of each token of `text` as this model's answer to `messages`."""
        return await self._when_a_slot_is_free(self._score_sync, messages, text)

    async def generate(self, messages: list[Message], *, max_tokens: int = 256,
                       stop: list[str] | None = None, on_text: Callable[[str], None] | None = None,
                       toolset: ToolSet | None = None, **_: object) -> Generation:
        """Greedy completion. `on_text`, if given, receives text deltas as they decode (called on
        the event loop's thread, in order); with `toolset`, calls decode under its grammar and come
        back parsed in `tool_calls` (their text is not streamed)."""
        if max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be >= 1, got {max_tokens}")
        loop = asyncio.get_running_loop()

        def callback(delta: str) -> None:
            loop.call_soon_threadsafe(on_text, delta)

        # Cancelled while its start runs: the slot that start claims is handed back once it has.
        # Batched, the start only places the prompt: the decode loop evaluates it, in chunks.
        d = await self._when_a_slot_is_free(self._begin if self.batching else self._start, messages, max_tokens,
                                            list(stop or []), callback if on_text is not None else None, toolset,
                                            if_abandoned=self._release_later)
        await self._run_decodings([d])
        return self._generation(d)

    async def generate_samples(self, messages: list[Message], n: int, *, max_tokens: int = 256,
                               stop: list[str] | None = None, temperature: float = 1.0, top_p: float = 1.0,
                               seed: int | None = None, toolset: ToolSet | None = None) -> list[Generation]:
        """`n` sampled completions of one prompt (temperature / top_p; `seed` makes them
        reproducible). The prompt is evaluated once and its KV shared by the n sequences, which
        decode together in the shared batch. Not streamed."""
        if not 1 <= n <= len(self._slots):
            raise InvalidRequestError(f"n must be between 1 and this engine's {len(self._slots)} slots "
                                      f"(local.n_slots), got {n}")
        if not temperature > 0:
            raise InvalidRequestError(f"sampling needs temperature > 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {top_p}")
        if max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be >= 1, got {max_tokens}")

        def abandon(ds: list[_Decoding]) -> None:
            for d in ds:
                self._release_later(d)

        ds = await self._when_a_slot_is_free(self._start_samples, messages, n, max_tokens, list(stop or []),
                                             toolset, float(temperature), float(top_p), seed, if_abandoned=abandon)
        await self._run_decodings(ds)
        return [self._generation(d) for d in ds]

    async def _run_decodings(self, ds: list[_Decoding]) -> None:
        """Decode `ds` to their ends: batched, in the shared decode loop; else one sequence at a
        time, a chunk per engine call (requests queued meanwhile run between chunks). Cancelled
        (client gone) or failed: their slots are freed after the chunk in flight."""
        if not self.batching:
            try:
                for d in ds:
                    while not await self._on_engine(self._step, d):
                        pass
            except BaseException:
                for d in ds:
                    if not d.done:
                        self._release_later(d)
                raise
            return
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in ds]
        self._active.extend(zip(ds, futures))
        if self._decoder is None or self._decoder.done():
            self._decoder = asyncio.create_task(self._decode_loop())
        try:
            await asyncio.gather(*futures)
        except asyncio.CancelledError:  # the loop drops them after the chunk in flight
            for d in ds:
                d.cancelled = True
            if self._decoder is None or self._decoder.done():
                for d in ds:
                    if not d.done:
                        self._release_later(d)
            raise

    async def _decode_loop(self) -> None:
        """Continuous batching: while generations are active, decode a chunk of all of them in one
        engine call after another. A generation that starts meanwhile joins at the next chunk,
        prompts (new generations', routing prefills queued meanwhile) ride along in its steps, and
        other requests queued meanwhile run between chunks."""
        with self._prefill_lock:  # prefills now wait for the next chunk instead of a job of their own
            self._riding = bool(self.decode_chunk)
        try:
            await self._decode_chunks()
        finally:
            with self._prefill_lock:
                self._riding = False
                if (self._prefills or self._prompts) and self._prefill_job is None:  # queued as the last chunk ended
                    self._prefill_job = self._executor.submit(self._drain_prefills)

    async def _decode_chunks(self) -> None:
        loop = asyncio.get_running_loop()
        for d, fut in [e for e in self._active if e[1].get_loop() is not loop]:  # left by a closed event loop
            d.cancelled = True
        while self._active:
            for d, _ in [e for e in self._active if e[0].cancelled]:
                if not d.done:
                    self._release_later(d)
            self._active[:] = [e for e in self._active if not e[0].cancelled]
            entries = list(self._active)
            if not entries:
                break
            ds = [d for d, _ in entries]
            try:
                await self._on_engine(self._step_batch, ds, self.decode_chunk or 1 << 30)  # 0: to the end
            except BaseException as exc:
                for d, fut in entries:
                    self._active.remove((d, fut))
                    if not d.done:
                        self._release_later(d)
                    if not fut.done():
                        fut.set_exception(exc if isinstance(exc, Exception) else HeraError("the engine stopped"))
                if not isinstance(exc, Exception):
                    raise
                continue
            for d, fut in entries:
                if d.done:
                    self._active.remove((d, fut))
                    if not fut.done():
                        if d.error is not None:
                            fut.set_exception(d.error if isinstance(d.error, Exception) else HeraError("the engine stopped"))
                        else:
                            fut.set_result(None)

    async def close(self) -> None:
        self._executor.shutdown(wait=True)
        if self._batch is not None:
            self._lib.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx is not None:
            self._ctx.close()
            self._model.close()
            self._ctx = None

