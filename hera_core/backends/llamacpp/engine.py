"""LlamaCppEngine: the async facade over the engine thread (hera_core.backends.llamacpp's
docstring describes the whole engine)."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hera_core.backends.base import Engine, Generation, Message, Prefill
from hera_core.backends.llamacpp.kvcache import NoFreeSlot, SlotCache
from hera_core.backends.llamacpp.model import LoadedModel
from hera_core.backends.llamacpp.sampling import GrammarCompiler
from hera_core.backends.llamacpp.requests import Decoding
from hera_core.backends.llamacpp.scheduler import Scheduler
from hera_core.backends.structured import ResponseFormat
from hera_core.backends.tools import CLOSE, OPEN, ToolSet
from hera_core.config import LlamaCppOptions
from hera_core.errors import HeraError, InvalidRequestError

if TYPE_CHECKING:
    from hera_core.config import HeraSettings


@dataclass(frozen=True)
class Occupancy:
    """What the engine holds at one moment (read from any thread: a snapshot, not a lock)."""

    busy: int  # slots whose generation is decoding
    placing: int  # slots whose prompt is placed and not yet evaluated
    waiting_prompts: int  # prompts being evaluated a chunk at a time in the shared decode steps


class LlamaCppEngine(Engine):
    is_local = True
    reports_logprobs = True  # generate(logprobs=k): each token's log-probability, with k alternatives

    def __init__(self, model_path: str | Path, *, name: str | None = None, options: LlamaCppOptions | None = None,
                 **kwargs: object) -> None:
        """The model file, its `name` in responses (default: the file's stem), and the engine's
        options: an `options` object, or its fields as keywords (hera_core.config.LlamaCppOptions
        says what each means, with its bounds; a bad one is an InvalidRequestError naming it).
        `from_settings` builds the engine from the [local] settings instead.

        Note on flash_attn: even with the same setting, llama.cpp's CPU kernels round differently
        for different batch splits, so a reused prefix can flip a near-tie (tests/test_kvcache.py)."""
        if options is not None and kwargs:
            raise TypeError("pass options= or the options as keywords, not both")
        opts = options if options is not None else LlamaCppOptions.of(**kwargs)
        self.options = opts
        self.name = name or Path(model_path).stem
        self.model = LoadedModel(model_path, self.name, opts)
        try:
            bpt = self.model.kv_bytes_per_token
            budget = opts.kv_budget_tokens * bpt if opts.kv_budget_tokens is not None else opts.kv_budget_bytes
            self.cache = SlotCache(self.model, opts.n_slots, opts.n_ctx, opts.block_size, bpt, budget, opts.kv_unified)
        except BaseException:
            self.model.close()
            raise
        # One worker thread: a llama.cpp context is not thread-safe, and calls queue in order.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"hera-{self.name}")
        grammars = GrammarCompiler(opts.tool_grammar, self.model.lib, self.model.vocab, self.model.n_vocab,
                                   {OPEN: self.model.open_token, CLOSE: self.model.close_token})
        # generate(response_format=...) decodes under the schema's grammar (not with the grammars off)
        self.structured_outputs = bool(grammars)
        self.scheduler = Scheduler(self.model, self.cache, grammars, decode_chunk=opts.decode_chunk,
                                   prefill_chunk=opts.prefill_chunk, submit=self._executor.submit)
        self._active: list[tuple[Decoding, asyncio.Future]] = []  # generations in the shared decode loop
        self._decoder: asyncio.Task | None = None

    @classmethod
    def from_settings(cls, settings: "HeraSettings") -> "LlamaCppEngine":
        """The engine the settings' [local] section describes (its model file resolved from the
        manifest name or path; its options validated once, by the settings)."""
        from hera_core.install.models import model_path

        loc = settings.local
        return cls(model_path(loc.model, settings.cache_dir), name=loc.model, options=loc.llamacpp_options())

    # --- what the engine is ----------------------------------------------------------------------
    n_ctx = property(lambda self: self.options.n_ctx, doc="tokens of prompt + completion of one subtask")
    n_batch = property(lambda self: self.options.n_batch, doc="tokens per llama_decode call")
    batching = property(lambda self: self.options.batching, doc="generations share each llama_decode")
    decode_chunk = property(lambda self: self.options.decode_chunk, doc="tokens per turn of a generation")
    prefill_chunk = property(lambda self: self.options.prefill_chunk, doc="prompt tokens per shared step")
    tool_grammar = property(lambda self: self.options.tool_grammar, doc="what runs the tool-call grammar")
    kv_unified = property(lambda self: self.options.kv_unified, doc="one KV pool for all slots")
    kv_cells = property(lambda self: self.model.kv_cells, doc="cells of the KV cache, all slots")
    kv_bytes_per_token = property(lambda self: self.model.kv_bytes_per_token, doc="KV bytes of one token")
    n_vocab = property(lambda self: self.model.n_vocab, doc="tokens in the vocabulary")

    @property
    def stats(self) -> dict[str, int]:
        """Counters since start: prompt tokens evaluated and reused, generated tokens, decode steps
        and the sequences in them, prompt chunks and prefills sharing steps."""
        return {**self.cache.counts, **self.scheduler.counts}

    def cache_stats(self) -> dict[str, float]:
        stats = self.stats
        seen = stats["prefill_tokens"] + stats["reused_tokens"]
        return {**stats, "hit_rate": stats["reused_tokens"] / seen if seen else 0.0,
                "bytes_held": self.cache.bytes_held, "evictions": self.cache.evictions}

    def occupancy(self) -> Occupancy:
        slots = self.cache.slots
        return Occupancy(busy=sum(s.busy for s in slots), placing=sum(s.placing for s in slots),
                         waiting_prompts=len(self.scheduler.prompts))

    def check_invariants(self) -> None:
        """The KV cache's invariants (AssertionError naming the first that does not hold); call
        it while no request runs."""
        self.cache.check_invariants()

    def tokenize_messages(self, messages: list[Message], toolset: ToolSet | None = None) -> list[int]:
        return self.model.tokenize_messages(messages, toolset)

    def detokenize(self, tokens: list[int]) -> str:
        return self.model.detokenize(tokens)

    # --- the engine thread --------------------------------------------------------------------
    def _release_later(self, d: Decoding) -> None:
        """Free `d`'s slot on the engine thread, after the work queued before it (any thread)."""
        try:
            self._executor.submit(self.scheduler.release, d)
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
            except NoFreeSlot:
                await asyncio.sleep(0.005)  # a chunk of some generation, at most, until one ends

    # --- the Engine interface -------------------------------------------------------------------
    async def prefill(self, messages: list[Message], *, toolset: ToolSet | None = None) -> Prefill:
        """The prompt's last-position logits. Prefills that wait for the engine thread together (as
        concurrent requests do behind a decode chunk) are evaluated together, in one batch."""
        if not self.batching:
            return await self._when_a_slot_is_free(self.scheduler.prefill, messages, toolset)
        while True:
            fut = asyncio.get_running_loop().create_future()
            self.scheduler.queue.put((messages, toolset, fut))
            try:
                return await fut
            except NoFreeSlot:
                await asyncio.sleep(0.005)  # a chunk of some generation, at most, until one ends

    async def score_continuation(self, messages: list[Message], text: str) -> list[float]:
        """Log-probability of each token of `text` as this model's answer to `messages`."""
        return await self._when_a_slot_is_free(self.scheduler.score, messages, text)

    async def generate(self, messages: list[Message], *, max_tokens: int = 256,
                       stop: list[str] | None = None, on_text: Callable[[str], None] | None = None,
                       toolset: ToolSet | None = None, response_format: ResponseFormat | None = None,
                       logprobs: int | None = None, **_: object) -> Generation:
        """Greedy completion. `on_text`, if given, receives text deltas as they decode (called on
        the event loop's thread, in order); with `toolset`, calls decode under its grammar and come
        back parsed in `tool_calls` (their text is not streamed); with `response_format`, the whole
        answer decodes under its schema's grammar (not with tools). `logprobs` (0-20): the answer
        carries its tokens' log-probabilities, each with that many alternatives, in OpenAI's shape
        (extra["logprobs"] = {"content": [{token, logprob, bytes, top_logprobs}, ...]})."""
        if max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be >= 1, got {max_tokens}")
        if logprobs is not None and not 0 <= logprobs <= 20:
            raise InvalidRequestError(f"logprobs must be between 0 and 20 alternatives, got {logprobs}")
        loop = asyncio.get_running_loop()

        def callback(delta: str) -> None:
            loop.call_soon_threadsafe(on_text, delta)

        # Cancelled while its start runs: the slot that start claims is handed back once it has.
        # Batched, the start only places the prompt: the decode loop evaluates it, in chunks.
        start = functools.partial(self.scheduler.begin if self.batching else self.scheduler.start,
                                  response_format=response_format, top_k=logprobs)
        d = await self._when_a_slot_is_free(start, messages, max_tokens, list(stop or []),
                                            callback if on_text is not None else None, toolset,
                                            if_abandoned=self._release_later)
        await self._run_decodings([d])
        return self._generation(d)

    async def generate_samples(self, messages: list[Message], n: int, *, max_tokens: int = 256,
                               stop: list[str] | None = None, temperature: float = 1.0, top_p: float = 1.0,
                               seed: int | None = None, toolset: ToolSet | None = None) -> list[Generation]:
        """`n` sampled completions of one prompt (temperature / top_p; `seed` makes them
        reproducible). The prompt is evaluated once and its KV shared by the n sequences, which
        decode together in the shared batch. Not streamed."""
        if not 1 <= n <= len(self.cache):
            raise InvalidRequestError(f"n must be between 1 and this engine's {len(self.cache)} slots "
                                      f"(local.n_slots), got {n}")
        if not temperature > 0:
            raise InvalidRequestError(f"sampling needs temperature > 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {top_p}")
        if max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be >= 1, got {max_tokens}")

        def abandon(ds: list[Decoding]) -> None:
            for d in ds:
                self._release_later(d)

        ds = await self._when_a_slot_is_free(self.scheduler.start_samples, messages, n, max_tokens,
                                             list(stop or []), toolset, (float(temperature), float(top_p), seed),
                                             if_abandoned=abandon)
        await self._run_decodings(ds)
        return [self._generation(d) for d in ds]

    def _generation(self, d: Decoding) -> Generation:
        latency = time.perf_counter() - d.t0
        text, calls, errors, finish = d.text, [], [], d.finish
        if d.toolset is not None:
            text, calls, errors = d.parsed_output()
            finish = "tool_calls" if calls and not errors else finish
        extra: dict = {"token_logprobs": d.logprobs}
        if d.top_k is not None:
            extra["logprobs"] = {"content": [self._token_logprob(tok, lp, alts) for tok, lp, alts in
                                             zip(d.out, d.logprobs, d.top if d.top_k else [[]] * len(d.out))]}
        return Generation(text=text, prompt_tokens=d.prompt_tokens, completion_tokens=len(d.out),
                          latency_s=latency, ttft_s=d.ttft if d.ttft is not None else latency,
                          finish_reason=finish, cached_tokens=d.reused, model=self.name,
                          extra=extra, tool_calls=calls, tool_errors=errors)

    def _token_logprob(self, token: int, lp: float, alternatives: list[tuple[int, float]]) -> dict:
        """One token of an answer as OpenAI's logprobs report it: its text, log-probability, UTF-8
        bytes (a token may hold part of a character) and the likeliest alternatives."""
        def entry(tok: int, value: float) -> dict:
            raw = self.model.token_bytes(tok)
            return {"token": raw.decode("utf-8", errors="replace"), "logprob": value, "bytes": list(raw)}

        return {**entry(token, lp), "top_logprobs": [entry(t, v) for t, v in alternatives]}

    # --- decoding to the end ----------------------------------------------------------------------
    async def _run_decodings(self, ds: list[Decoding]) -> None:
        """Decode `ds` to their ends: batched, in the shared decode loop; else one sequence at a
        time, a chunk per engine call (requests queued meanwhile run between chunks). Cancelled
        (client gone) or failed: their slots are freed after the chunk in flight."""
        if not self.batching:
            try:
                for d in ds:
                    while not await self._on_engine(self.scheduler.step, d):
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
        queue = self.scheduler.queue
        queue.ride(bool(self.decode_chunk))  # prefills now wait for the next chunk instead of a job of their own
        try:
            await self._decode_chunks()
        finally:
            queue.land(pending=bool(self.scheduler.prompts))

    def _drop_cancelled(self) -> list[tuple[Decoding, asyncio.Future]]:
        for d, _ in [e for e in self._active if e[0].cancelled]:
            if not d.done:
                self._release_later(d)
        self._active[:] = [e for e in self._active if not e[0].cancelled]
        return list(self._active)

    async def _decode_chunks(self) -> None:
        loop = asyncio.get_running_loop()
        for d, fut in [e for e in self._active if e[1].get_loop() is not loop]:  # left by a closed event loop
            d.cancelled = True
        while self._active:
            entries = self._drop_cancelled()
            if not entries:
                break
            try:
                await self._on_engine(self.scheduler.step_batch, [d for d, _ in entries],
                                      self.decode_chunk or 1 << 30)  # 0: to the end
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
        self.model.close()
