"""Benchmarks run on the real models; `make bench` installs them first.

Ordering: a module that sets INTERLEAVE_PAIRS = True names each side `test_<thing>_<impl>[<id>]`;
its items are reordered so all impls of one (thing, id) run together (native[b1], xgboost[b1],
native[b16], ...). On a shared, noisy machine the two sides then see the same load, so their ratio
(what `make bench-compare` checks) means more than their absolute times.

HERA_BENCH_SMOKE=1 (`make bench-smoke`, CI): each benchmark once on a small workload
(bench/support.py).
"""

from __future__ import annotations

import pytest

from bench.support import SMOKE


def pytest_report_header(config: pytest.Config) -> str:
    return "hera bench: smoke mode (small workloads, numbers mean nothing)" if SMOKE else "hera bench: measuring run"


def _pair_key(item: pytest.Item) -> tuple[str, str]:
    name = getattr(item, "originalname", None) or item.name  # test_forest_native
    thing = name.rsplit("_", 1)[0]  # test_forest
    return thing, item.callspec.id if hasattr(item, "callspec") else ""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    opted = [i for i, item in enumerate(items) if getattr(getattr(item, "module", None), "INTERLEAVE_PAIRS", False)]
    if not opted:
        return
    chosen = [items[i] for i in opted]
    # First appearance of each (thing, id) fixes the order of the pairs; stable within a pair.
    first: dict[tuple[str, str], int] = {}
    for n, item in enumerate(chosen):
        first.setdefault(_pair_key(item), n)
    reordered = sorted(chosen, key=lambda item: first[_pair_key(item)])
    for slot, item in zip(opted, reordered):
        items[slot] = item
