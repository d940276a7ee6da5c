"""Tool calls decoded under the tools' grammar (run by llama.cpp's grammar sampler, or by
llguidance from the same grammar) against unconstrained decoding, on the SLM.

Qwen2.5-Coder-0.5B-Instruct (HERA_BENCH_MODEL names another), greedy, the tools rendered by its
chat template either way; 12 requests over three tools (two flat schemas and one with a nested
object, an array and enums). Two tool_choice settings: "required" (the grammar is on from the
first token) and "auto" (on once the model opens a call). Both sides run in one session.

extra_info: valid_share (requests whose answer holds at least one call and no invalid one),
invalid_share (requests with a call that fails its schema or does not parse: what the runtime
escalates; an unfinished call counts here too), no_call_share, seconds_per_request,
tokens_per_request. A measurement, not a test: that an invalid call is never returned is tested in
tests/test_tools.py. HERA_BENCH_MODEL=smollm2-135m shows a model that cannot call tools by itself.
Smoke mode (HERA_BENCH_SMOKE=1): SmolLM2-135M, one request (the nested schema), at most 64 tokens.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time

import pytest

from bench.support import sized
from hera_core.backends.tools import ToolSet
from hera_core.install.models import model_path

MODEL = os.environ.get("HERA_BENCH_MODEL", sized("qwen2.5-coder-0.5b", "smollm2-135m"))
THREADS = int(os.environ.get("HERA_BENCH_THREADS", "1"))
ADD = {"type": "function", "function": {"name": "add", "description": "Add two integers.", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city.",
                                             "parameters": {"type": "object", "required": ["city"], "properties": {
                                                 "city": {"type": "string"},
                                                 "unit": {"enum": ["celsius", "fahrenheit"]}}}}}
BOOK = {"type": "function", "function": {"name": "book_flight", "description": "Book a flight.", "parameters": {
    "type": "object", "required": ["route", "passengers", "cabin"], "properties": {
        "route": {"type": "object", "required": ["from", "to"],
                  "properties": {"from": {"type": "string"}, "to": {"type": "string"}}},
        "passengers": {"type": "array", "items": {"type": "integer"}, "minItems": 1},
        "cabin": {"enum": ["economy", "business"]}, "max_price": {"type": "number"}}}}}
TOOLS = [ADD, WEATHER, BOOK]
REQUESTS = ["What is 1234 plus 4321?", "Add 17 and 25 for me.", "Sum of 908 and 77?", "Compute 5 + 13.",
            "What's the weather in Paris?", "Is it cold in Oslo right now, in fahrenheit?",
            "Weather in Lima please, celsius.", "How warm is it in Tokyo?",
            "Book an economy flight from Oslo to Rome for passengers 1 and 2.",
            "I need a business class flight from Lima to Quito for passenger 7, under 900.",
            "Book flight Paris to Berlin, economy, passengers 3, 4 and 5.",
            "Get me from Madrid to Lisbon in business, passenger 11."]


REQUESTS = sized(REQUESTS, REQUESTS[-1:])  # smoke: one (the nested schema)
MAX_TOKENS = sized(160, 64)


def run_requests(grammar: bool | str, choice: str) -> dict:
    from hera_core.backends.llamacpp import LlamaCppEngine

    engine = LlamaCppEngine(model_path(MODEL), name=MODEL, n_ctx=2048, n_threads=THREADS, n_slots=2,
                            tool_grammar=grammar)
    ts = ToolSet.parse(TOOLS, choice)
    outcomes, seconds, tokens = [], [], []

    async def go():
        for text in REQUESTS:
            t0 = time.perf_counter()
            gen = await engine.generate([{"role": "user", "content": text}], max_tokens=MAX_TOKENS, toolset=ts)
            seconds.append(time.perf_counter() - t0)
            tokens.append(gen.completion_tokens)
            outcomes.append("invalid" if gen.tool_errors else "valid" if gen.tool_calls else "none")
        await engine.close()

    asyncio.run(go())
    n = len(REQUESTS)
    return {"valid_share": outcomes.count("valid") / n, "invalid_share": outcomes.count("invalid") / n,
            "no_call_share": outcomes.count("none") / n, "seconds_per_request": statistics.mean(seconds),
            "tokens_per_request": statistics.mean(tokens)}


@pytest.mark.parametrize("choice", ["required", "auto"])
@pytest.mark.parametrize("grammar", ["llama.cpp", "llguidance", False],
                         ids=["grammar", "llguidance", "unconstrained"])
def test_tool_calls(benchmark, grammar, choice):
    try:
        model_path(MODEL)
    except Exception as exc:  # noqa: BLE001
        pytest.skip(str(exc))
    result = benchmark.pedantic(run_requests, args=(grammar, choice), rounds=1, iterations=1)
    benchmark.extra_info.update(result)
