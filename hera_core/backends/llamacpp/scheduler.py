"""The engine thread's work: prompts placed in their slots and evaluated (whole, or a chunk at a
time in the shared decode steps), routing prefills, and generations decoded a step at a time,
every active sequence's next token in one llama_decode (continuous batching).

Everything here runs on the engine's one thread, except `PrefillQueue.put`, which event loops
call. Requests are `Decoding` (a generation) and `Prompt` (a prompt being evaluated), in
`requests`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np

from hera_core.backends.base import Message, Prefill, check_context
from hera_core.backends.llamacpp.batch import Span
from hera_core.backends.llamacpp.kvcache import Placed, SlotCache
from hera_core.backends.llamacpp.model import LoadedModel
from hera_core.backends.llamacpp.requests import Decoding, Prompt, Waiter, deliver
from hera_core.backends.llamacpp.sampling import Grammar, GrammarCompiler, Sampling, choose, logprob, top_logprobs
from hera_core.backends.structured import ResponseFormat
from hera_core.backends.tools import ToolSet
from hera_core.errors import CannotServeLocallyError

class PrefillQueue:
    """Routing prefills waiting for the engine thread; the next job there takes all of them. While
    a decode loop runs (`riding`), its steps take them instead of a job of their own."""

    def __init__(self, submit_drain: Callable[[], object]) -> None:
        self._submit = submit_drain  # queues a drain job on the engine thread
        self._lock = threading.Lock()  # filled on event loops, drained on the engine thread
        self._waiting: list[Waiter] = []
        self._job = None  # a drain job queued and not yet started
        self.riding = False  # a decode loop runs: its steps take the queued prefills

    def put(self, waiter: Waiter) -> None:
        with self._lock:
            self._waiting.append(waiter)
            if self._job is None and not self.riding:  # else the next decode chunk takes it
                self._job = self._submit()

    def take(self) -> list[Waiter]:
        """The prefills queued so far (engine thread), less those whose caller went away."""
        with self._lock:
            taken, self._waiting = self._waiting, []
        return [w for w in taken if not w[2].cancelled()]

    def job_started(self) -> None:
        with self._lock:
            self._job = None

    def ride(self, riding: bool) -> None:
        """A decode loop starts: while `riding`, its steps take the prefills."""
        with self._lock:
            self.riding = riding

    def land(self, pending: bool) -> None:
        """The decode loop ended: a drain job takes what is left (prefills queued as the last chunk
        ended; `pending`: prompts that loop left unfinished)."""
        with self._lock:
            self.riding = False
            if (self._waiting or pending) and self._job is None:
                self._job = self._submit()


class Scheduler:
    """Places prompts, evaluates them and decodes generations, on the engine thread."""

    def __init__(self, model: LoadedModel, cache: SlotCache, grammars: GrammarCompiler, *,
                 decode_chunk: int, prefill_chunk: int, submit: Callable) -> None:
        self.model, self.cache, self.grammars = model, cache, grammars
        self.decode_chunk = decode_chunk  # tokens a generation decodes per engine call (0: to its end)
        self.prefill_chunk = prefill_chunk  # prompt tokens per shared decode step (0: whole prompts)
        self.prompts: list[Prompt] = []  # prompts evaluated chunk by chunk, first come first
        self.queue = PrefillQueue(lambda: submit(self.drain_prefills))
        self.counts = {"generated_tokens": 0,
                       "decode_steps": 0, "batched_sequences": 0,  # generation decodes; sequences in them
                       "prefill_batches": 0, "batched_prefills": 0,  # prompt evaluations of several requests
                       "prefills_with_decodes": 0,  # routing prefills evaluated in a generation's decode
                       "prompt_chunks": 0, "prompts_with_decodes": 0}  # generations' prompt chunks; with decodes

    # --- evaluation -------------------------------------------------------------------------------
    def _decode(self, spans: list[Span], every_row: bool = False) -> list[np.ndarray]:
        # One prompt alone may make room by dropping every unpinned block and trying again (the
        # unified layout can run out of cells); a shared step fails as a whole.
        on_full = self.cache.evict_all if len(spans) == 1 else None
        return self.model.batch.decode(spans, every_row=every_row, on_full=on_full)

    def eval_prompt(self, tokens: list[int], reserve: int = 0) -> Placed:
        """Bring some slot's KV to `tokens`, evaluating only what is not cached; `reserve` is room
        kept for the completion. The placement comes back settled, with its logits."""
        placed = self.cache.place(tokens, reserve)
        if placed.logits is None:
            try:
                placed.logits = self._decode([Span(tokens[placed.reused:], placed.slot, placed.reused)])[0]
            except BaseException:
                self.cache.unplace(placed)
                raise
        self.cache.settle(placed)
        return placed

    def score(self, messages: list[Message], text: str) -> list[float]:
        """Teacher-forced: the log-probability of each token of `text` as the answer to `messages`
        (one batched evaluation, logits at every position)."""
        prompt = self.model.tokenize_messages(messages)
        cont = self.model.tokenize_text(text)
        if not cont:
            return []
        check_context(len(prompt + cont), self.cache.n_ctx)
        placed = self.eval_prompt(prompt, reserve=len(cont))
        out = [logprob(placed.logits, cont[0])]
        if len(cont) > 1:
            rows = self._decode([Span(cont[:-1], placed.slot, len(prompt))], every_row=True)[0]
            out += [logprob(row, tok) for row, tok in zip(rows, cont[1:])]
            self.cache.append(placed.slot, cont[:-1], None)  # the slot now holds the prompt and the continuation
            self.cache.index(placed.slot)
        return out

    def prefill(self, messages: list[Message], toolset: ToolSet | None = None) -> Prefill:
        """A routing prefill evaluated at once (the engine without batching)."""
        t0 = time.perf_counter()
        tokens = self.model.tokenize_messages(messages, toolset)
        placed = self.eval_prompt(tokens)
        return Prefill(logits=placed.logits, prompt_tokens=len(tokens), cached_tokens=placed.reused,
                       latency_s=time.perf_counter() - t0)

    # --- generations: begin (place), start (evaluate whole), samples ---------------------------
    def begin(self, messages: list[Message], max_tokens: int, stop: list[str],
              on_text: Callable[[str], None] | None, toolset: ToolSet | None = None, *,
              response_format: ResponseFormat | None = None, top_k: int | None = None) -> Decoding:
        """Place the prompt in a slot (its cached prefix kept or linked) for a new generation. What
        is left to evaluate waits in `prompts` for the shared decode steps; an exact repeat of the
        slot's last prompt claims it at once. `response_format`: the answer decodes under its
        grammar; `top_k`: each token's log-probability is reported, with top_k alternatives."""
        t0 = time.perf_counter()
        tokens = self.model.tokenize_messages(messages, toolset)
        grammar = self._first_grammar(toolset, response_format)
        max_tokens = max(0, min(max_tokens, self.cache.n_ctx - len(tokens)))
        try:
            placed = self.cache.place(tokens, reserve=max_tokens)
        except BaseException:
            if grammar is not None:
                grammar.close()
            raise
        d = Decoding(slot=placed.slot, logits=None, max_tokens=max_tokens, stop=stop, on_text=on_text, t0=t0,
                     prompt_tokens=len(tokens), reused=placed.reused, pinned=0, toolset=toolset, grammar=grammar,
                     top_k=top_k)
        if placed.logits is not None:
            self._claim(d, placed)
        else:
            d.prompt = Prompt(placed, placed.reused, t0, decoding=d)
            self.prompts.append(d.prompt)
        return d

    def _first_grammar(self, toolset: ToolSet | None, response_format: ResponseFormat | None = None) -> Grammar | None:
        """The grammar a generation starts under: a response format's for the whole answer; a tool
        call's where the answer must be one; else none (free text; with tool choice "auto" a
        call's grammar starts when its opener is emitted, in `_advance`)."""
        if response_format is not None:
            if toolset is not None or not self.grammars:
                raise CannotServeLocallyError("a response_format with tools offered, or without grammars "
                                              "(tool_grammar off), is not decoded on this engine")
            return self.grammars.response_format(response_format)
        if toolset is not None and toolset.choice in ("required", "function") and self.grammars:
            return self.grammars.tool_call(toolset, opened=False)  # the answer must be a call
        return None

    def _claim(self, d: Decoding, placed: Placed) -> None:
        """`d`'s prompt is evaluated: settle it and claim the slot for decoding."""
        self.cache.settle(placed)
        d.pinned = self.cache.claim(d.slot)
        d.logits, d.prompt = placed.logits, None

    def start(self, messages: list[Message], max_tokens: int, stop: list[str],
              on_text: Callable[[str], None] | None, toolset: ToolSet | None = None, *,
              response_format: ResponseFormat | None = None, top_k: int | None = None) -> Decoding:
        """Evaluate the prompt into a slot, whole, and claim it for this generation."""
        d = self.begin(messages, max_tokens, stop, on_text, toolset, response_format=response_format, top_k=top_k)
        if d.prompt is not None:
            self._evaluate([], [(d.prompt, len(d.prompt.tokens) - d.prompt.done)])
        return d

    def start_samples(self, messages: list[Message], n: int, max_tokens: int, stop: list[str],
                      toolset: ToolSet | None, sampling: tuple[float, float, int | None]) -> list[Decoding]:
        """`n` sampled generations of one prompt: evaluated once, its KV copied into n - 1 more
        slots (no recomputation), each with its own random stream. `sampling`: (temperature,
        top_p, seed)."""
        first = self.start(messages, max_tokens, stop, None, toolset)
        ds = [first]
        try:
            for _ in range(n - 1):
                slot, pinned = self.cache.copy(first.slot)
                grammar = self._first_grammar(toolset)
                ds.append(Decoding(slot=slot, logits=first.logits, max_tokens=first.max_tokens, stop=stop,
                                   on_text=None, t0=first.t0, prompt_tokens=first.prompt_tokens,
                                   reused=first.prompt_tokens, pinned=pinned, toolset=toolset, grammar=grammar))
        except BaseException:
            for d in ds:  # not enough idle slots yet (or a failure): hand back what was claimed
                self.release(d)
            raise
        temperature, top_p, seed = sampling
        for d, ss in zip(ds, np.random.SeedSequence(seed).spawn(n)):
            d.sampling = Sampling(np.random.default_rng(ss), temperature, top_p)
        return ds

    # --- decoding -------------------------------------------------------------------------------
    def _advance(self, d: Decoding) -> int | None:
        """Pick `d`'s next token from its current logits and account for it (text, stop strings,
        streaming, the tool-call grammar). Returns the token to evaluate next, or None once `d`
        is done (end of generation, a stop string, max_tokens)."""
        if len(d.out) >= d.max_tokens:
            d.done = True
            return None
        banned = (self.model.open_token if d.toolset is not None and d.toolset.choice == "none" else None)
        token = choose(d.logits, d.grammar, d.sampling, banned)  # greedy unless sampled: reproducible, cacheable
        if d.ttft is None:
            d.ttft = time.perf_counter() - d.t0
        if self.model.is_eog(token):
            d.finish, d.done = "stop", True
            return None
        d.out.append(token)
        d.logprobs.append(logprob(d.logits, token))  # the draft checks' token-level confidence
        if d.top_k:
            d.top.append(top_logprobs(d.logits, d.top_k))
        if d.grammar is not None:
            d.grammar.accept(token)
        elif d.toolset is not None and d.toolset.choice == "auto" and token == self.model.open_token and self.grammars:
            d.grammar = self.grammars.tool_call(d.toolset, opened=True)  # the model chose to call a tool
        d.text = self.model.detokenize(d.out)
        if self._stopped_or_streamed(d):
            return None
        if len(d.out) == d.max_tokens:
            d.done = True
            return None
        return token

    @staticmethod
    def _stopped_or_streamed(d: Decoding) -> bool:
        """End `d` at a stop string (True), else stream what can no longer become one."""
        content = d.content()
        hits = [content.index(x) for x in d.stop if x in content]
        if hits and len(content) == len(d.text):
            d.text, d.finish, d.done = d.text[: min(hits)], "stop", True
            return True
        holdback = max((len(x) for x in d.stop), default=1) - 1  # what could still become a stop string
        if d.on_text is not None and len(content) - holdback > d.sent:
            d.on_text(content[d.sent: len(content) - holdback])
            d.sent = len(content) - holdback
        return False

    def step(self, d: Decoding) -> bool:
        """Decode up to `decode_chunk` tokens of `d` alone (all of it when 0); True once it is done."""
        return self.step_batch([d], self.decode_chunk or d.max_tokens)

    def step_batch(self, ds: list[Decoding], steps: int) -> bool:
        """Up to `steps` tokens of every generation in `ds`, each step one llama_decode over all of
        them (one token per sequence, each at its own position of its own slot): decoding reads
        the weights once for the whole batch. Waiting prompts (new generations', routing prefills
        queued meanwhile) ride along, `prefill_chunk` tokens per step. Finished generations are
        released. True once all of `ds` are done."""
        for _ in range(steps):
            if self.queue.riding:  # with decode_chunk 0 a generation keeps the engine to its end: they wait
                self.admit_prefills()
            stepping = [(d, tok) for d in ds
                        if d.prompt is None and not d.done and (tok := self._advance(d)) is not None]
            chunks = self._prompt_chunks(self.prefill_chunk)
            if not stepping and not chunks:
                break
            if stepping:
                self.counts["decode_steps"] += 1
                self.counts["batched_sequences"] += len(stepping)
            spans = [Span([tok], d.slot, len(self.cache.slot(d.slot).tokens)) for d, tok in stepping]
            rows = self._evaluate(spans, chunks)
            for (d, tok), logits in zip(stepping, rows):
                self.cache.append(d.slot, [tok], logits)
                d.logits = logits
        for d in ds:
            if d.done and not d.released:
                self._finish(d)
        return all(d.done for d in ds)

    def _finish(self, d: Decoding) -> None:
        """Flush the text held back, then hand the slot back."""
        content = d.content()
        if d.on_text is not None and len(content) > d.sent:
            d.on_text(content[d.sent:])
            d.sent = len(content)
        self.release(d)

    def release(self, d: Decoding) -> None:
        """Unpin the prompt, free the slot and index what it now holds (prompt + decoded tokens).
        Once per generation: a late second call must not free a slot another one claimed since."""
        if d.grammar is not None:
            d.grammar.close()
            d.grammar = None
        if d.prompt is not None:  # released before its prompt was in: the slot was never claimed
            p, d.prompt = d.prompt, None
            self._drop_prompt(p)
            d.released = True
            return
        if not d.released:
            d.released = True
            self.cache.release(d.slot, d.prompt_tokens, d.pinned)
            self.counts["generated_tokens"] += len(d.out)

    # --- prompts evaluated in the shared steps ----------------------------------------------------
    def _prompt_chunks(self, budget: int) -> list[tuple[Prompt, int]]:
        """The next tokens of the waiting prompts, first come first, `budget` in all (0: all)."""
        out, left = [], budget or float("inf")
        for p in self.prompts:
            if left <= 0:
                break
            n = int(min(len(p.tokens) - p.done, left))
            out.append((p, n))
            left -= n
        return out

    def _evaluate(self, spans: list[Span], chunks: list[tuple[Prompt, int]]) -> list[np.ndarray]:
        """One step's evaluation: `spans` (the generations' next tokens) and the prompts' `chunks`,
        packed into shared llama_decode calls. A prompt whose last token is in is ready: its
        generation may decode, its prefill goes back. Returns the logits after each span."""
        work = [Span(p.tokens[p.done:p.done + n], p.placed.slot, p.done) for p, n in chunks]
        try:
            rows = self._decode(spans + work) if spans or work else []
        except BaseException as exc:
            for p, _ in chunks:
                self._fail_prompt(p, exc)
            raise
        self._count_chunks(len(spans), chunks)
        ready: list[tuple[Waiter, Prefill]] = []
        for (p, n), row in zip(chunks, rows[len(spans):]):
            p.done += n
            if p.done < len(p.tokens):
                continue
            self.prompts.remove(p)
            p.placed.logits = row
            if p.decoding is not None:
                self._claim(p.decoding, p.placed)
            else:
                self.cache.settle(p.placed)
                ready.append((p.waiter, Prefill(logits=row, prompt_tokens=len(p.tokens),
                                                cached_tokens=p.placed.reused, latency_s=time.perf_counter() - p.t0)))
        if ready:
            deliver([w for w, _ in ready], [r for _, r in ready])
        return rows[:len(spans)]

    def _count_chunks(self, n_spans: int, chunks: list[tuple[Prompt, int]]) -> None:
        if not chunks:
            return
        routing = sum(p.waiter is not None for p, _ in chunks)
        self.counts["prompt_chunks"] += len(chunks) - routing
        if n_spans:
            self.counts["prefills_with_decodes"] += routing
            self.counts["prompts_with_decodes"] += len(chunks) - routing
        if n_spans + len(chunks) > 1:
            self.counts["prefill_batches"] += 1
            self.counts["batched_prefills"] += len(chunks)

    def _drop_prompt(self, p: Prompt) -> None:
        """A prompt that will not be finished: its slot keeps the cached prefix only."""
        if p in self.prompts:
            self.prompts.remove(p)
        self.cache.abandon(p.placed)

    def _fail_prompt(self, p: Prompt, exc: BaseException) -> None:
        """Its evaluation failed: the caller hears why."""
        if p.decoding is not None:
            d = p.decoding
            d.error, d.done = exc, True
            self.release(d)
        else:
            self._drop_prompt(p)
            deliver([p.waiter], [exc])

    # --- routing prefills -----------------------------------------------------------------------
    def admit_prefills(self) -> None:
        """Place the routing prefills queued so far; what they leave to evaluate joins `prompts`
        (a bad request, or an exact repeat, is answered at once)."""
        answered: list[tuple[Waiter, object]] = []
        for waiter in self.queue.take():
            messages, toolset, _ = waiter
            t0 = time.perf_counter()
            try:
                tokens = self.model.tokenize_messages(messages, toolset)
                placed = self.cache.place(tokens)
            except Exception as exc:  # noqa: BLE001 - handed to that request's caller
                answered.append((waiter, exc))
                continue
            if placed.logits is not None:  # an exact repeat: nothing to evaluate
                self.cache.settle(placed)
                answered.append((waiter, Prefill(logits=placed.logits, prompt_tokens=len(tokens),
                                                 cached_tokens=placed.reused, latency_s=time.perf_counter() - t0)))
            else:
                self.prompts.append(Prompt(placed, placed.reused, t0, waiter=waiter))
        if answered:
            deliver([w for w, _ in answered], [r for _, r in answered])

    def drain_prefills(self) -> None:
        """No decode loop running: every routing prefill queued so far, and any prompt a loop left
        unfinished, evaluated whole in one batch."""
        self.queue.job_started()
        self.admit_prefills()
        if self.prompts:
            try:
                self._evaluate([], self._prompt_chunks(0))
            except Exception:  # noqa: BLE001 - each caller has heard why
                pass
