"""The vote stage's price in time: a task's first step drafted by the SLM and voted on by k = 4
samples, with the draft and the first two samples decoding together (the runtime's way) against
the draft first and its samples after it, on the same engine, prompts and threads, in one run.

Prompts: the first steps of the first gsm_symbolic and basic_arithmetic test tasks (the SLM
writes a program; its output is what the samples vote on). Qwen2.5-Coder-0.5B-Instruct by
default (HERA_BENCH_MODEL names another manifest model), HERA_BENCH_THREADS threads (default 2).

extra_info: vote_step_s (mean wall time of one drafted, checked and voted step), samples_drawn
(mean; 2 when the first two agree with the draft), draft_only_s (the greedy draft alone, for
scale), and, on the concurrent case, ratio_vs_in_turn (its vote_step_s over the other's).
Smoke mode (HERA_BENCH_SMOKE=1): SmolLM2-135M on 1 thread, one gsm_symbolic prompt, 48 tokens.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

import pytest

from bench.support import sized
from hera_core.install.models import model_path
from hera_core.offline.harness import first_messages
from hera_core.offline.workloads import make_tasks

MODEL = os.environ.get("HERA_BENCH_MODEL", sized("qwen2.5-coder-0.5b", "smollm2-135m"))
THREADS = int(os.environ.get("HERA_BENCH_THREADS", sized("2", "1")))
MAX_TOKENS = sized(384, 48)
FAMILIES, PER_FAMILY = sized((["basic_arithmetic", "gsm_symbolic"], 2), (["gsm_symbolic"], 1))
_results: dict[str, float] = {}


def prompts() -> list[list[dict]]:
    tasks = make_tasks(FAMILIES, per_family=PER_FAMILY, seed=0, split="test")
    return [first_messages(t) for t in tasks]


def run_votes(concurrently: bool) -> dict:
    from hera_core.backends.llamacpp import LlamaCppEngine
    from hera_core.config import load_settings
    from hera_core.routing.ledger import Ledger
    from hera_core.routing.plan import Action
    from hera_core.routing.predictor import Predictor, VoteStage
    from hera_core.routing.runtime import Runtime
    from hera_core.routing.step import StepRequest, StepRun

    async def go():
        engine = LlamaCppEngine(model_path(MODEL), name=MODEL, n_ctx=4096, n_threads=THREADS, n_slots=6)
        predictor = Predictor.load()
        predictor.vote = VoteStage(steps=1, k=4, min_share=0.5)
        ledger = Ledger(Path(tempfile.mkdtemp()) / "ledger.sqlite")
        # The cloud is never called; unfamiliar="trust": the vote stage decides the step whatever the
        # familiarity check says of these prompts.
        rt = Runtime(engine, engine, predictor, ledger, load_settings(env={}).prices, unfamiliar="trust")
        rt.drafter.concurrently = concurrently
        times, drawn, drafts = [], [], []
        try:
            for msgs in prompts():
                t0 = time.perf_counter()
                await engine.generate(msgs, max_tokens=MAX_TOKENS)
                drafts.append(time.perf_counter() - t0)
                # the prefill (cached by the draft above) scores it
                plan, score = await rt.plan(StepRequest(msgs, "bench", step=0))
                assert plan.action is Action.VOTE, plan
                t0 = time.perf_counter()
                st = StepRun(StepRequest(msgs, "bench", step=0), max_tokens=MAX_TOKENS, toolset=None, plan=plan,
                             features=score.features[0])
                _, check, _ = await rt.drafter.draft(st, predictor)
                times.append(time.perf_counter() - t0)
                drawn.append(check.agreement.samples if check.agreement is not None else 0)
        finally:
            await engine.close()
            ledger.close()
        return {"vote_step_s": round(statistics.mean(times), 3), "samples_drawn": statistics.mean(drawn),
                "draft_only_s": round(statistics.mean(drafts), 3)}

    return asyncio.run(go())


@pytest.mark.parametrize("mode", ["in_turn", "concurrent"])
def test_vote_step_time(benchmark, mode):
    try:
        model_path(MODEL)
    except Exception as exc:  # noqa: BLE001 - no model here: say which
        pytest.skip(f"needs {MODEL}: {exc}")
    info = benchmark.pedantic(run_votes, args=(mode == "concurrent",), rounds=1, iterations=1)
    _results[mode] = info["vote_step_s"]
    if mode == "concurrent" and "in_turn" in _results:
        info["ratio_vs_in_turn"] = round(info["vote_step_s"] / _results["in_turn"], 3)
    benchmark.extra_info.update(info)
