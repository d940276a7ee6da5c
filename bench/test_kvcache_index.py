"""Radix index benchmarks: the native RadixIndex against its pure-Python twin PyRadixIndex.

The workload is what the local engine asks of the index: 8 agent sessions x 6 steps, interleaved
round-robin, each step one `match` then one `insert` of the whole prompt (int32 token ids) into the
session's slot. A session's prompt is its own 1000-token system prompt plus 150 tokens per step so
far (1150..1900 tokens, about 1500 on average); block size 16; SmolLM2-135M's KV size per token;
a byte budget of 700 blocks, below the 950 the sessions end up needing, so the late steps evict.
Both sides of the pair run back to back (bench/conftest.py) on one thread, from a fresh index each
round, and must return the same results. Run: pytest bench/test_kvcache_index.py --benchmark-only
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from hera_core import native
from hera_core.native.radix import PyRadixIndex

SESSIONS = 8
STEPS = 6
SYSTEM_TOKENS = 1000
STEP_TOKENS = 150
BLOCK_SIZE = 16
BYTES_PER_TOKEN = 30 * 2 * 3 * 64 * 2  # SmolLM2-135M: layers x (K, V) x KV heads x head dim x f16
BUDGET = 700 * BLOCK_SIZE * BYTES_PER_TOKEN
VOCAB = 49152
WARMUP_CALLS = 3
INTERLEAVE_PAIRS = True  # bench/conftest.py runs test_radix_native and test_radix_python back to back


def agent_prompts() -> list[tuple[int, np.ndarray]]:
    """(slot, prompt) in round-robin order: step k of session s extends its step k-1."""
    rng = np.random.default_rng(0)
    convs = [rng.integers(0, VOCAB, SYSTEM_TOKENS + STEPS * STEP_TOKENS, dtype=np.int32) for _ in range(SESSIONS)]
    return [(s, np.ascontiguousarray(convs[s][: SYSTEM_TOKENS + (k + 1) * STEP_TOKENS]))
            for k in range(STEPS) for s in range(SESSIONS)]


def run_workload(cls: Any, prompts: list[tuple[int, np.ndarray]]) -> tuple[list[Any], Any]:
    """A fresh index, then match + insert per step; the results and the index."""
    index = cls(BLOCK_SIZE, BYTES_PER_TOKEN, BUDGET, SESSIONS)
    out = []
    for slot, prompt in prompts:
        out.append(index.match(prompt))
        out.append(index.insert(prompt, slot))
    return out, index


@pytest.fixture(scope="module")
def prompts() -> list[tuple[int, np.ndarray]]:
    return agent_prompts()


@pytest.fixture(scope="module")
def native_cls(prompts) -> Any:
    """The native class, checked once against the twin on the whole workload."""
    cls = native.load().RadixIndex
    got, idx = run_workload(cls, prompts)
    want, ref = run_workload(PyRadixIndex, prompts)
    assert got == want
    assert (idx.evictions, idx.matched_tokens, idx.bytes_held) == (ref.evictions, ref.matched_tokens, ref.bytes_held)
    assert ref.evictions > 0  # the budget binds: eviction is part of what is timed
    return cls


def bench(benchmark, cls: Any, prompts) -> None:
    benchmark.group = "radix match+insert, 8 sessions x 6 steps"
    for _ in range(WARMUP_CALLS):
        run_workload(cls, prompts)
    _, index = benchmark(run_workload, cls, prompts)
    benchmark.extra_info.update(
        ops=2 * len(prompts),
        prompt_tokens=int(sum(len(p) for _, p in prompts)),
        matched_tokens=index.matched_tokens,
        evictions=index.evictions,
    )


def test_radix_native(benchmark, native_cls, prompts) -> None:
    """hera_core._native.RadixIndex: hashed child lookup, ordered LRU set, GIL released per call."""
    bench(benchmark, native_cls, prompts)


def test_radix_python(benchmark, prompts) -> None:
    """PyRadixIndex, the pure-Python twin and reference (dict children, linear LRU scan)."""
    bench(benchmark, PyRadixIndex, prompts)
