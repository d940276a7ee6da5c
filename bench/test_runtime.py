"""What routing costs an embedding service per step: `Runtime.complete` against the bare engine call.

Both sides call the same instant engines (they return a stored answer and, for prefill, a stored
Qwen2.5-sized logits row), so the difference is HERA's own work per subtask: the logit features
of one 151,936-token row, the structure features, the shipped predictor, the decision, and the
ledger row committed to SQLite (WAL, synchronous=NORMAL) before the call returns.

- test_engine_direct: `await local.generate(messages)`, what an application does without HERA
- test_runtime_complete_local / _cloud: `await runtime.complete(messages, session=...)`, the
  threshold forcing each route (the cloud route skips nothing: scoring runs first either way)
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from hera_core.config import PriceSettings
from hera_core.backends.base import Engine, Generation, Prefill
from hera_core.routing.ledger import Ledger
from hera_core.routing.predictor import Predictor
from hera_core.routing.runtime import Runtime

VOCAB = 151_936
MESSAGES = [{"role": "system", "content": "You are a careful coding agent."},
            {"role": "user", "content": "Compute 17 * 23 with Python and give the result."}]


class _Instant(Engine):
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
    rt = Runtime(_Instant("slm", True), _Instant("llm", False), Predictor.load(),
                 Ledger(tmp_path_factory.mktemp("ledger") / "ledger.sqlite"), PriceSettings())
    yield rt


def test_engine_direct(benchmark, loop, runtime) -> None:
    benchmark.group = "one subtask"
    out = benchmark(lambda: loop.run_until_complete(runtime.local.generate(MESSAGES)))
    assert out.text


@pytest.mark.parametrize("route,threshold", [("local", 0.0), ("cloud", 1.01)])
def test_runtime_complete(benchmark, loop, runtime, route: str, threshold: float) -> None:
    benchmark.group = "one subtask"
    before = runtime.ledger.totals()["subtasks"]
    result = benchmark(lambda: loop.run_until_complete(
        runtime.complete(MESSAGES, session="bench", threshold=threshold)))
    assert result.route.value == route and result.ledger_id > 0
    assert runtime.ledger.totals()["subtasks"] - before >= benchmark.stats.stats.rounds  # a row per call


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
    before = dict(runtime._scorer.stats)
    scores = benchmark(lambda: loop.run_until_complete(fn()))
    calls = runtime._scorer.stats["batches"] - before["batches"]
    assert len(scores) == 8 and len({round(s.p_local, 6) for s in scores}) == 1
    assert calls * (8 if mode == "together" else 1) == runtime._scorer.stats["rows"] - before["rows"]
    benchmark.extra_info["us_per_step"] = benchmark.stats.stats.mean / 8 * 1e6
