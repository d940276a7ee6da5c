"""What routing costs an embedding service per step: `Runtime.complete` against the bare engine call.

Both sides call the same instant engines (they return a stored answer and, for prefill, a stored
Qwen2.5-sized logits row), so the difference is HERA's own work per subtask: the logit features
of one 151,936-token row, the structure features, the shipped predictor, the decision, and the
ledger row committed to SQLite (WAL, synchronous=NORMAL) before the call returns.

- test_engine_direct: `await local.generate(messages)`, what an application does without HERA
- test_runtime_complete[local] / [cloud]: `await runtime.complete(messages, session=...)`, the
  threshold forcing each route (the cloud route skips nothing: scoring runs first either way)

The messages are the first step of a gsm_symbolic task as the harness writes it: a step the shipped
predictor's familiarity check finds familiar, so both routes take the default path (familiarity
check included) and the predictor's P against the threshold decides, as in production. (A step it
finds unfamiliar goes to the cloud whatever the threshold: `unfamiliar="cloud"`, the default.)

extra_info: calls (subtasks run, each with its ledger row), and ratio_vs_engine: after the timed
rounds, PAIRS calls of the bare engine and of `complete` alternate (the same machine load on both
sides) and the ratio of their medians is what `make bench-compare` checks (bench/compare.py);
engine_median_us and complete_median_us beside it.
"""

from __future__ import annotations

import asyncio
import statistics
import time

import numpy as np
import pytest

from bench.support import sized

from hera_core.config import PriceSettings
from hera_core.backends.base import Engine, Generation, Prefill
from hera_core.routing.ledger import Ledger
from hera_core.routing.predictor import Predictor
from hera_core.routing.runtime import Runtime

VOCAB = 151_936
PAIRS = sized(3000, 20)  # alternating (engine, complete) calls behind ratio_vs_engine
MESSAGES = [{"role": "system", "content": "You are a careful problem solver with a Python tool. Keep answers short. "
                                          "When asked for code, reply with one ```python code block that prints the "
                                          "answer."},
            {"role": "user", "content": "A building is made out of 4 orange blocks, 2 times as many green blocks, and "
                                        "an unknown number of white blocks. If there are 31 blocks in the building in "
                                        "total, how many white blocks are there? Give the result as your final answer. "
                                        "Do not include units.\n\nWrite a short Python program that computes and "
                                        "prints the answer."}]


class InstantEngine(Engine):
    """Answers at once: isolates the router's own cost (a benchmark fixture, not a model)."""

    def __init__(self, name: str, is_local: bool) -> None:
        self.name, self.is_local = name, is_local
        rng = np.random.default_rng(0)
        self._logits = (rng.standard_normal(VOCAB, dtype=np.float32) * 4)
        self._gen = Generation(text="```python\nprint(17 * 23)\n```", prompt_tokens=48, completion_tokens=12,
                               latency_s=0.0, ttft_s=0.0, finish_reason="stop", model=name)

    async def prefill(self, messages):
        return Prefill(logits=self._logits, prompt_tokens=48, cached_tokens=0, latency_s=0.0)

    async def generate(self, messages, **_):
        return self._gen


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    predictor = Predictor.load()
    if predictor.familiarity is not None and not predictor.familiarity.familiar(MESSAGES):
        pytest.fail("the shipped predictor finds MESSAGES unfamiliar (it was retrained?): every step would go to "
                    "the cloud; take the first step of a task of one of its training families instead")
    ledger = Ledger(tmp_path_factory.mktemp("ledger") / "ledger.sqlite")
    yield Runtime(InstantEngine("slm", True), InstantEngine("llm", False), predictor, ledger, PriceSettings())
    ledger.close()


def test_engine_direct(benchmark, loop, runtime) -> None:
    benchmark.group = "one subtask"
    out = benchmark(lambda: loop.run_until_complete(runtime.local.generate(MESSAGES)))
    assert out.text


@pytest.mark.parametrize("route,threshold", [("local", 0.0), ("cloud", 1.01)])
def test_runtime_complete(benchmark, loop, runtime, route: str, threshold: float) -> None:
    benchmark.group = "one subtask"
    before = runtime.ledger.totals()["subtasks"]
    calls = 0

    def one():
        nonlocal calls
        calls += 1
        return loop.run_until_complete(runtime.complete(MESSAGES, session="bench", threshold=threshold))

    result = benchmark(one)
    assert (result.route.value, result.decision.reason) == (route, "predictor") and result.ledger_id > 0
    assert runtime.ledger.totals()["subtasks"] - before == calls  # a row per call
    benchmark.extra_info["calls"] = calls
    engine, complete = paired_medians(lambda: loop.run_until_complete(runtime.local.generate(MESSAGES)), one)
    benchmark.extra_info.update(engine_median_us=round(engine * 1e6, 2), complete_median_us=round(complete * 1e6, 2),
                                ratio_vs_engine=round(complete / engine, 3))


def paired_medians(a, b, pairs: int = PAIRS) -> tuple[float, float]:
    """Medians (s) of a() and b() called in turn `pairs` times: both sides under the same load."""
    ta, tb = [], []
    for _ in range(pairs):
        t0 = time.perf_counter()
        a()
        t1 = time.perf_counter()
        b()
        ta.append(t1 - t0)
        tb.append(time.perf_counter() - t1)
    return statistics.median(ta), statistics.median(tb)


@pytest.mark.parametrize("mode", ["together", "one-by-one"])
def test_scoring_8_concurrent_steps(benchmark, loop, runtime, mode: str) -> None:
    """Scoring 8 steps whose prefills came back together (one feature call and one predictor call
    over 8 rows) against the same 8 scored one after another. extra_info: us_per_step."""
    benchmark.group = "scoring 8 steps"

    async def together():
        return await asyncio.gather(*[runtime.score(MESSAGES, 0) for _ in range(8)])

    async def one_by_one():
        return [await runtime.score(MESSAGES, 0) for _ in range(8)]

    fn = together if mode == "together" else one_by_one
    before = runtime.score_stats
    scores = benchmark(lambda: loop.run_until_complete(fn()))
    calls = runtime.score_stats["batches"] - before["batches"]
    assert len(scores) == 8 and len({round(s.p_local, 6) for s in scores}) == 1
    assert calls * (8 if mode == "together" else 1) == runtime.score_stats["rows"] - before["rows"]
    if benchmark.stats is not None:  # None in a smoke run (--benchmark-disable)
        benchmark.extra_info["us_per_step"] = benchmark.stats.stats.mean / 8 * 1e6
