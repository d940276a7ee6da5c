"""Prefix KV-cache reuse on an interleaved agent workload, three engines in one run.

8 agent sessions x 6 steps on SmolLM2-135M, round-robin. Each session starts from its own
~300-token system prompt; each step adds a ~150-token user turn and up to 32 greedy tokens.

- test_agent_steps_reuse: HERA's engine (multi-slot KV cache, one stream per session, + radix index)
- test_agent_steps_noreuse: llama-cpp-python's plain `Llama` (keeps only the last sequence's prefix)
- test_agent_steps_ramcache: `Llama` with `LlamaRAMCache` large enough for every session
- test_one_session_reuse / _plain: session 0 alone in ours and in the plain `Llama` (which then
  keeps its prefix too): the no-switch floor of the time to first token

extra_info: prefill_tokens (evaluated), ideal_prefill_tokens (new tokens only), ttft_s_steps3plus
(mean time to first token of steps 3 and later), rss_growth_mb (RSS after minus before, engine
creation included), outputs_sha (to check that greedy outputs are token-identical). All three
use the same threads and the same attention kernel (flash attention on; llama-cpp-python's Llama
defaults to off, which alone changes greedy outputs). Smoke mode (HERA_BENCH_SMOKE=1): 2 sessions
x 3 steps, short turns, 8 tokens.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import time

import pytest

from bench.support import sized
from hera_core.install.models import model_path

SESSIONS, STEPS, MAX_NEW = sized((8, 6, 32), (2, 3, 8))  # steps 3+ are timed: at least 3
SYSTEM_WORDS, TURN_WORDS = sized((280, 140), (40, 20))
THREADS = int(os.environ.get("HERA_BENCH_THREADS", "1"))
N_CTX = 2048  # per session: the longest conversation here is about 1,600 tokens
WORDS = ("agent tool plan step value result check list table file query answer model token cache prefix "
         "router cloud local budget cost ledger price engine batch score trace label feature threshold").split()


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def workload():
    """Per session: a system prompt (~300 tokens) and 6 user turns (~150 tokens each)."""
    rng = random.Random(7)
    return [(f"Session {s}. You are agent {s}. " + text(rng, SYSTEM_WORDS),
             [text(rng, TURN_WORDS) for _ in range(STEPS)]) for s in range(SESSIONS)]


class _Ours:
    def __init__(self, path):
        from hera_core.backends.llamacpp import LlamaCppEngine

        self.engine = LlamaCppEngine(path, n_ctx=N_CTX, n_threads=THREADS, n_slots=SESSIONS)
        self.loop = asyncio.new_event_loop()

    def tokens(self, messages):
        return self.engine.tokenize_messages(messages)

    def step(self, messages):
        before = self.engine.stats["prefill_tokens"]
        gen = self.loop.run_until_complete(self.engine.generate(messages, max_tokens=MAX_NEW))
        return gen.text, gen.ttft_s, self.engine.stats["prefill_tokens"] - before

    def close(self):
        self.loop.run_until_complete(self.engine.close())
        self.loop.close()


class _Plain:
    """llama-cpp-python's Llama, greedy, with or without its RAM cache."""

    def __init__(self, path, ramcache: bool):
        from llama_cpp import Llama, LlamaRAMCache

        self.llm = Llama(model_path=str(path), n_ctx=N_CTX, n_threads=THREADS, n_threads_batch=THREADS,
                         n_batch=512, flash_attn=True, verbose=False)  # as ours: the setting changes outputs
        if ramcache:
            self.llm.set_cache(LlamaRAMCache(capacity_bytes=64 << 30))
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self._formatter = Jinja2ChatFormatter(template=self.llm.metadata["tokenizer.chat_template"],
                                              eos_token=self.llm._model.token_get_text(self.llm.token_eos()),
                                              bos_token="")
        self.prefill = 0
        self._in_prefill = False
        inner_eval = self.llm.eval

        def counting_eval(tokens):
            if self._in_prefill:
                self.prefill += len(tokens)
            return inner_eval(tokens)

        self.llm.eval = counting_eval

    def tokens(self, messages):
        prompt = self._formatter(messages=messages).prompt
        return self.llm.tokenize(prompt.encode(), add_bos=False, special=True)

    def step(self, messages):
        t0 = time.perf_counter()  # from the messages, as ours (which formats and tokenizes inside)
        toks = self.tokens(messages)
        before = self.prefill
        self._in_prefill = True
        ttft, parts = None, []
        for chunk in self.llm.create_completion(toks, max_tokens=MAX_NEW, temperature=0.0, stream=True):
            if ttft is None:
                ttft = time.perf_counter() - t0
                self._in_prefill = False
            parts.append(chunk["choices"][0]["text"])
        self._in_prefill = False
        return "".join(parts), ttft or (time.perf_counter() - t0), self.prefill - before

    def close(self):
        self.llm.close()


def run_agents(make_engine, n_sessions: int = SESSIONS) -> dict:
    rss0 = rss_mb()
    eng = make_engine()
    sessions = [[{"role": "system", "content": sys_prompt}] for sys_prompt, _ in workload()[:n_sessions]]
    turns = [t for _, t in workload()]
    prev_tokens: list[list[int]] = [[] for _ in sessions]
    prefill = ideal = 0
    ttfts, outputs = [], []
    for step in range(STEPS):
        for s, conv in enumerate(sessions):
            conv.append({"role": "user", "content": turns[s][step]})
            toks = eng.tokens(conv)
            common = 0
            for a, b in zip(prev_tokens[s], toks):
                if a != b:
                    break
                common += 1
            ideal += len(toks) - common
            out, ttft, evaluated = eng.step(conv)
            prefill += evaluated
            if step >= 2:
                ttfts.append(ttft)
            outputs.append(out)
            conv.append({"role": "assistant", "content": out})
            prev_tokens[s] = toks + eng.tokens(conv)[len(toks):]  # what the KV holds after this step
    rss1 = rss_mb()
    eng.close()
    return {"prefill_tokens": prefill, "ideal_prefill_tokens": ideal,
            "ttft_s_steps3plus": sum(ttfts) / len(ttfts), "rss_growth_mb": round(rss1 - rss0, 1),
            "outputs_sha": hashlib.sha256("\x00".join(outputs).encode()).hexdigest()[:16], "threads": THREADS}


@pytest.fixture(scope="module")
def path():
    return model_path("smollm2-135m")


def _bench(benchmark, make, n_sessions: int = SESSIONS):
    result = {}

    def go():
        result.update(run_agents(make, n_sessions))

    benchmark.pedantic(go, rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    print(result)


def test_agent_steps_reuse(benchmark, path):
    """HERA's engine: multi-slot KV cache (one stream per session) with the radix index."""
    _bench(benchmark, lambda: _Ours(path))


def test_agent_steps_noreuse(benchmark, path):
    """llama-cpp-python's plain Llama: only the last sequence's prefix survives."""
    _bench(benchmark, lambda: _Plain(path, ramcache=False))


def test_agent_steps_ramcache(benchmark, path):
    """llama-cpp-python's Llama with LlamaRAMCache holding every session's state."""
    _bench(benchmark, lambda: _Plain(path, ramcache=True))


# The floor: one session alone, where plain llama-cpp-python keeps its prefix too and nobody
# switches. What is left of a step's time to first token is the prefill of its new tokens.


def test_one_session_reuse(benchmark, path):
    """HERA's engine, session 0 of the workload alone."""
    _bench(benchmark, lambda: _Ours(path), n_sessions=1)


def test_one_session_plain(benchmark, path):
    """Plain llama-cpp-python, session 0 alone: its own prefix reuse covers every step."""
    _bench(benchmark, lambda: _Plain(path, ramcache=False), n_sessions=1)
