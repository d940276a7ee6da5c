"""A routing decision while another session's local answer decodes, on the one engine thread.

SmolLM2-135M (HERA_BENCH_MODEL names another manifest model). Session A asks for a long answer (128 greedy tokens); as soon as it streams its
first text, session B sends its next step, whose scoring prefill (what the router needs before
it can send B to the cloud or keep it) evaluates B's ~150 new tokens on top of its cached history.
Each round uses a new turn for B. Two engines in one run:

- decode_chunk=8 (the default): A yields the engine every 8 tokens, B's prefill runs in between
- decode_chunk=0: A holds the engine to its last token (how the engine worked before)
- alone: B's prefill with nothing else running, the floor

extra_info: prefill_wait_s (median over rounds of B's prefill, sent to done), answer_latency_s
(median of A's whole answer), a_tokens, and whether A's answer is the same in every round.
Smoke mode (HERA_BENCH_SMOKE=1): 2 rounds, 24 tokens, short turns.
"""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import time

import pytest

from bench.support import sized
from hera_core.install.models import model_path

THREADS = int(os.environ.get("HERA_BENCH_THREADS", "1"))
MODEL = os.environ.get("HERA_BENCH_MODEL", "smollm2-135m")
ROUNDS, A_TOKENS = sized((6, 128), (2, 24))
HISTORY_WORDS, TURN_WORDS = sized((250, 140), (40, 20))
WORDS = "agent tool plan step value result check list table file query answer model token cache".split()
LONG = [{"role": "user", "content": "Count from 1 to 300, separated by commas."}]


def run_rounds(chunk: int, with_answer: bool = True) -> dict:
    from hera_core.backends.llamacpp import LlamaCppEngine

    rng = random.Random(3)
    eng = LlamaCppEngine(model_path(MODEL), n_ctx=2048, n_threads=THREADS, n_slots=4,
                         decode_chunk=chunk)
    history = [{"role": "system",
                "content": "You are agent B. " + " ".join(rng.choice(WORDS) for _ in range(HISTORY_WORDS))}]
    waits, latencies, answers = [], [], set()

    async def one_round(turn: str) -> None:
        history.append({"role": "user", "content": turn})
        decoding = asyncio.Event()
        answer = None
        if with_answer:
            answer = asyncio.create_task(eng.generate(LONG, max_tokens=A_TOKENS, on_text=lambda _: decoding.set()))
            await decoding.wait()
        t0 = time.perf_counter()
        await eng.prefill(history)
        waits.append(time.perf_counter() - t0)
        if answer is not None:
            gen = await answer
            latencies.append(gen.latency_s)
            answers.add((gen.text, gen.completion_tokens))
        history.append({"role": "assistant", "content": "noted"})

    async def go() -> None:
        await eng.prefill(history + [{"role": "user", "content": "start"}])  # B's history is cached
        for _ in range(ROUNDS):
            await one_round(" ".join(rng.choice(WORDS) for _ in range(TURN_WORDS)))
        await eng.close()

    asyncio.run(go())
    n_tokens = next(iter(answers))[1] if len(answers) == 1 else -1
    return {"decode_chunk": chunk, "with_answer": with_answer, "prefill_wait_s": statistics.median(waits),
            "answer_latency_s": statistics.median(latencies) if latencies else None, "a_tokens": n_tokens,
            "same_answer_every_round": len(answers) <= 1, "threads": THREADS, "model": MODEL}


@pytest.mark.parametrize("chunk,with_answer", [(8, True), (0, True), (8, False)],
                         ids=["chunk8", "chunk0", "alone"])
def test_prefill_during_a_local_answer(benchmark, chunk: int, with_answer: bool) -> None:
    benchmark.group = "routing prefill during a local answer"
    result: dict = {}
    benchmark.pedantic(lambda: result.update(run_rounds(chunk, with_answer)), rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    print(result)
    assert result["same_answer_every_round"]
