"""Local SLM engine on llama.cpp (llama-cpp-python), the embedded default.

Decoding is greedy and driven here token by token, so the prefill that scores a subtask is the
one its local decode continues from. The KV of the last evaluated prompt stays in the context:
a prompt that extends it (the next step of the same agent session) evaluates only its new tokens.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..errors import ContextOverflowError, InvalidRequestError
from .base import Engine, Generation, Message, Prefill


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class LlamaCppEngine(Engine):
    is_local = True

    def __init__(self, model_path: str | Path, *, name: str | None = None, n_ctx: int = 4096,
                 n_threads: int = 1, n_threads_batch: int | None = None, n_batch: int = 512) -> None:
        from llama_cpp import Llama
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        if n_threads < 1:
            raise InvalidRequestError(f"n_threads must be >= 1, got {n_threads}")
        self.name = name or Path(model_path).stem
        self._llm = Llama(model_path=str(model_path), n_ctx=n_ctx, n_batch=n_batch,
                          n_threads=n_threads, n_threads_batch=n_threads_batch or n_threads,
                          logits_all=False, verbose=False)
        model = self._llm._model
        template = self._llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise InvalidRequestError(f"model {self.name} has no chat template; use an instruct model")
        eos = self._llm.token_eos()
        self._formatter = Jinja2ChatFormatter(
            template=template, eos_token=model.token_get_text(eos),
            bos_token=model.token_get_text(self._llm.token_bos()) if self._llm.token_bos() != -1 else "")
        # Tokens that end a turn: EOS and whatever the vocabulary marks end-of-generation.
        self._stop_ids = {t for t in range(self._llm.n_vocab()) if self._is_eog(t)} | {eos}
        self.n_ctx = n_ctx
        self.n_vocab = self._llm.n_vocab()
        # One worker thread: a llama.cpp context is not thread-safe, and calls queue in order.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"hera-{self.name}")
        self._kv_tokens: list[int] = []  # tokens whose KV sits in the context (sequence 0)
        self._last_logits: np.ndarray | None = None  # logits after the last of _kv_tokens
        # Counters (tokens): evaluated vs. reused from the KV prefix.
        self.stats = {"prefill_tokens": 0, "reused_tokens": 0, "generated_tokens": 0}

    def _is_eog(self, token: int) -> bool:
        import llama_cpp

        return bool(llama_cpp.llama_vocab_is_eog(self._llm._model.vocab, token))

    # --- tokens -------------------------------------------------------------------------------
    def tokenize_messages(self, messages: list[Message]) -> list[int]:
        if not messages:
            raise InvalidRequestError("messages must not be empty")
        try:
            prompt = self._formatter(messages=messages).prompt
        except Exception as exc:  # jinja raises for roles the template does not accept
            raise InvalidRequestError(f"cannot format messages with the model's chat template: {exc}") from exc
        return self._llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)

    def _check_fits(self, tokens: list[int], max_tokens: int = 1) -> None:
        if len(tokens) + 1 > self.n_ctx:
            raise ContextOverflowError(
                f"prompt has {len(tokens)} tokens, the local model's context window is {self.n_ctx}; "
                "shorten the conversation or raise local.n_ctx")

    # --- blocking work, on the engine thread ----------------------------------------------------
    def _eval_prompt(self, tokens: list[int]) -> tuple[np.ndarray, int]:
        """Bring the context to `tokens`, evaluating only what differs. Returns (logits, reused)."""
        self._check_fits(tokens)
        keep = _common_prefix(self._kv_tokens, tokens)
        if keep == len(tokens) == len(self._kv_tokens) and self._last_logits is not None:
            return self._last_logits, keep  # the exact prompt is already evaluated
        keep = min(keep, len(tokens) - 1)  # always evaluate at least one token to get its logits
        self._llm.n_tokens = keep  # Llama.eval drops KV from n_tokens on before evaluating
        self._llm.eval(tokens[keep:])
        self._kv_tokens = list(tokens)
        self._last_logits = self._read_logits()
        self.stats["prefill_tokens"] += len(tokens) - keep
        self.stats["reused_tokens"] += keep
        return self._last_logits, keep

    def _read_logits(self) -> np.ndarray:
        ptr = self._llm._ctx.get_logits_ith(-1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def _prefill_sync(self, messages: list[Message]) -> Prefill:
        t0 = time.perf_counter()
        tokens = self.tokenize_messages(messages)
        logits, reused = self._eval_prompt(tokens)
        return Prefill(logits=logits, prompt_tokens=len(tokens), cached_tokens=reused,
                       latency_s=time.perf_counter() - t0)

    def _generate_sync(self, messages: list[Message], max_tokens: int, stop: list[str],
                       on_text: Callable[[str], None] | None = None) -> Generation:
        t0 = time.perf_counter()
        tokens = self.tokenize_messages(messages)
        logits, reused = self._eval_prompt(tokens)
        max_tokens = max(0, min(max_tokens, self.n_ctx - len(tokens)))
        # A streamed delta holds back what could still become a stop string.
        holdback = max((len(s) for s in stop), default=1) - 1
        out: list[int] = []
        text, sent = "", 0
        finish = "length"
        ttft = None
        while len(out) < max_tokens:
            token = int(np.argmax(logits))  # greedy: outputs are reproducible and cacheable
            if ttft is None:
                ttft = time.perf_counter() - t0
            if token in self._stop_ids:
                finish = "stop"
                break
            out.append(token)
            text = self._llm.detokenize(out).decode("utf-8", errors="ignore")
            hits = [text.index(s) for s in stop if s in text]
            if hits:
                text = text[: min(hits)]
                finish = "stop"
                break
            if on_text is not None and len(text) - holdback > sent:
                on_text(text[sent: len(text) - holdback])
                sent = len(text) - holdback
            if len(out) == max_tokens:
                break
            self._llm.eval([token])
            self._kv_tokens.append(token)
            logits = self._last_logits = self._read_logits()
        if on_text is not None and len(text) > sent:
            on_text(text[sent:])
        self.stats["generated_tokens"] += len(out)
        latency = time.perf_counter() - t0
        return Generation(text=text, prompt_tokens=len(tokens), completion_tokens=len(out),
                          latency_s=latency, ttft_s=ttft if ttft is not None else latency,
                          finish_reason=finish, cached_tokens=reused, model=self.name)

    # --- async interface ------------------------------------------------------------------------
    async def prefill(self, messages: list[Message]) -> Prefill:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._prefill_sync, messages)

    async def generate(self, messages: list[Message], *, max_tokens: int = 256,
                       stop: list[str] | None = None, on_text: Callable[[str], None] | None = None) -> Generation:
        """Greedy completion. `on_text`, if given, receives text deltas as they decode (called on
        the event loop's thread, in order)."""
        if max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be >= 1, got {max_tokens}")
        loop = asyncio.get_running_loop()
        callback = None
        if on_text is not None:
            def callback(delta: str) -> None:
                loop.call_soon_threadsafe(on_text, delta)
        return await loop.run_in_executor(
            self._executor, self._generate_sync, messages, max_tokens, list(stop or []), callback)

    async def close(self) -> None:
        self._executor.shutdown(wait=True)
        llm, self._llm = self._llm, None
        if llm is not None:
            llm.close()


def default_threads() -> int:
    """One thread per engine unless HERA_THREADS says otherwise: on 2 shared cores llama.cpp's
    spin-waiting workers stall each other (measured: 2 threads 36-41 prompt tok/s, 1 thread 218-229)."""
    return max(1, int(os.environ.get("HERA_THREADS", "1")))
