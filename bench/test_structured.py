"""Structured outputs on the SLM (#32 item 1): decoding constrained by a grammar compiled from the
response_format's schema against unconstrained decoding, in one process.

Qwen2.5-Coder-0.5B-Instruct (HERA_BENCH_MODEL names another), greedy, 56 schemas generated from a
seed (nested objects up to three levels, arrays of strings, integers and objects with maxItems,
enums, integers with bounds, numbers, booleans, required subsets; strings bounded with maxLength).
Each request is what the runtime sends the SLM for a structured step: the client's prompt (which
names the fields) and `generate(response_format=...)`, decoded

- llama.cpp: under the schema's grammar run by llama.cpp's grammar sampler (what `hera serve` runs);
- llguidance: the same grammar run by llguidance (local.tool_grammar = "llguidance");
- unconstrained: the same prompt, no grammar.

The three engines are loaded together and the sides alternate request by request, so they see the
same machine load. Time per token is decode time only: (latency - time to first token) /
(completion tokens - 1); each constrained side's ratio to unconstrained is reported as the ratio of
summed decode time per summed tokens, and as the median of the per-schema ratios (target: within
1.15). extra_info also gives each side's valid_share (the answer parses and validates against its
schema with jsonschema), unfinished_share (cut by max_tokens: never returned by the runtime, the step
is escalated) and invalid_share (finished, but not valid). The target "100% of local structured
answers validate" is a constrained side's invalid_share = 0 (and unfinished_share = 0 at this
max_tokens).

Smoke mode (HERA_BENCH_SMOKE=1): SmolLM2-135M, 3 schemas, at most 96 tokens.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics

import jsonschema
import pytest

from bench.support import sized
from hera_core.backends.structured import ResponseFormat
from hera_core.install.models import model_path

MODEL = os.environ.get("HERA_BENCH_MODEL", sized("qwen2.5-coder-0.5b", "smollm2-135m"))
THREADS = int(os.environ.get("HERA_BENCH_THREADS", "1"))
MAX_TOKENS = sized(320, 96)

_NAMES = ["name", "city", "title", "owner", "status", "kind", "price", "count", "tags", "items", "address",
          "contact", "email", "phone", "notes", "priority", "due", "steps", "score", "active", "color", "size",
          "country", "label", "amount", "quantity", "rating", "author", "year", "category"]
_TOPICS = ["a book order", "a flight booking", "a support ticket", "a weather report", "a recipe", "a todo list",
           "a product listing", "a job posting", "a hotel reservation", "a bug report", "a movie review",
           "an invoice", "a meeting plan", "a shipping label"]


def _leaf(rng: random.Random) -> dict:
    kind = rng.choice(["string", "integer", "number", "boolean", "enum", "string"])
    if kind == "string":
        return {"type": "string", "maxLength": rng.choice([12, 20, 30])}
    if kind == "integer":
        return {"type": "integer", "minimum": 0, "maximum": rng.choice([10, 100, 5000])}
    if kind == "enum":
        return {"enum": rng.sample(["low", "medium", "high", "open", "closed", "red", "green", "blue"], 3)}
    return {"type": kind}


def _object(rng: random.Random, depth: int, strict: bool) -> dict:
    names = rng.sample(_NAMES, rng.randint(2, 4))
    props = {}
    for name in names:
        roll = rng.random()
        if depth < 3 and roll < 0.2:
            props[name] = _object(rng, depth + 1, strict)
        elif roll < 0.4:
            items = _object(rng, depth + 1, strict) if depth < 2 and rng.random() < 0.3 else _leaf(rng)
            props[name] = {"type": "array", "items": items, "minItems": 1, "maxItems": rng.choice([2, 3])}
        else:
            props[name] = _leaf(rng)
    required = names if strict else sorted(rng.sample(names, rng.randint(1, len(names))))
    schema = {"type": "object", "properties": props, "required": required}
    if strict:
        schema["additionalProperties"] = False
    return schema


def schemas(n: int, seed: int = 32) -> list[tuple[str, dict]]:
    """n (prompt, response_format) pairs, reproducible from the seed; every second one strict."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        strict = i % 2 == 0
        schema = _object(rng, 1, strict)
        topic = rng.choice(_TOPICS)
        fmt = {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema, "strict": strict}}
        out.append((f"Make up {topic}, with the fields {', '.join(schema['properties'])}.", fmt))
    return out


CASES = sized(schemas(56), schemas(3))


def _outcome(gen, fmt: ResponseFormat) -> str:
    if gen.finish_reason == "length":
        return "unfinished"
    return "valid" if fmt.validate(gen.text) is None else "invalid"


SIDES = (("llama.cpp", "llama.cpp"), ("llguidance", "llguidance"), ("unconstrained", False))


def run_sides() -> dict:
    from hera_core.backends.llamacpp import LlamaCppEngine

    path = model_path(MODEL)
    engines = {side: LlamaCppEngine(path, name=MODEL, n_ctx=2048, n_threads=THREADS, n_slots=1, tool_grammar=g)
               for side, g in SIDES}
    decode_s = {side: 0.0 for side in engines}
    tokens = {side: 0 for side in engines}
    outcomes: dict[str, list[str]] = {side: [] for side in engines}
    per_schema: dict[str, list[float]] = {side: [] for side in engines}

    async def ask(side: str, prompt: str, fmt: ResponseFormat, max_tokens: int):
        return await engines[side].generate([{"role": "user", "content": prompt}], max_tokens=max_tokens,
                                            **({"response_format": fmt} if side != "unconstrained" else {}))

    async def go():
        warm = ResponseFormat.parse(CASES[0][1])
        for side in engines:  # warm-up: the first decode pays for allocations (llguidance: its tokenizer)
            await ask(side, "Hi", warm, 8)
        for prompt, raw in CASES:
            fmt = ResponseFormat.parse(raw)
            per_token = {}
            for side in engines:
                gen = await ask(side, prompt, fmt, MAX_TOKENS)
                outcomes[side].append(_outcome(gen, fmt))
                if gen.completion_tokens > 1:
                    decode_s[side] += gen.latency_s - gen.ttft_s
                    tokens[side] += gen.completion_tokens - 1
                    per_token[side] = (gen.latency_s - gen.ttft_s) / (gen.completion_tokens - 1)
            if len(per_token) == len(engines):
                for side in engines:
                    per_schema[side].append(per_token[side] / per_token["unconstrained"])
        for engine in engines.values():
            await engine.close()

    asyncio.run(go())
    n = len(CASES)
    unconstrained = decode_s["unconstrained"] / tokens["unconstrained"]
    info: dict = {"schemas": n, "model": MODEL}
    for side in engines:
        info[f"{side}_ms_per_token"] = 1000 * decode_s[side] / tokens[side]
        info[f"{side}_tokens_per_request"] = tokens[side] / n
        if side != "unconstrained":
            info[f"{side}_ratio_time_per_token"] = (decode_s[side] / tokens[side]) / unconstrained
            info[f"{side}_ratio_median_per_schema"] = statistics.median(per_schema[side])
        for kind in ("valid", "unfinished", "invalid"):
            info[f"{side}_{kind}_share"] = outcomes[side].count(kind) / n
    return info


def test_schemas_are_valid_and_varied():
    """The generated schemas are JSON Schema, strict where they say so, and cover the shapes asked for."""
    text = json.dumps([fmt for _, fmt in schemas(56)])
    for _, fmt in schemas(56):
        jsonschema.validators.validator_for(fmt["json_schema"]["schema"]).check_schema(fmt["json_schema"]["schema"])
        ResponseFormat.parse(fmt)  # strict ones pass the strict checks
    assert all(k in text for k in ('"enum"', '"array"', '"maxItems"', '"minimum"', '"boolean"'))
    assert sum('"properties": {' in json.dumps(f["json_schema"]["schema"]["properties"]) for _, f in schemas(56)) >= 10


def test_structured_decoding(benchmark):
    try:
        model_path(MODEL)
    except Exception as exc:  # noqa: BLE001
        pytest.skip(str(exc))
    result = benchmark.pedantic(run_sides, rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    print(json.dumps(result, indent=1))
