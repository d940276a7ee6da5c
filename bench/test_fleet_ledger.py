"""What a shared fleet ledger adds to a cloud step: booking a row and holding / settling the budget
on a private PostgreSQL server (on this machine, over 127.0.0.1), against the single node's SQLite
file and in-memory caps, in one run.

extra_info: us_per_step (mean over the rounds).
"""

from __future__ import annotations

import time

import pytest

from hera_core.routing.budget import Budget
from hera_core.routing.ledger import Ledger, LedgerRow
from tests.pg import PgCluster

ROUNDS = 300


def cloud_row(i: int) -> LedgerRow:
    return LedgerRow(run="bench", session=f"s{i % 50}", step=i, route="cloud", model="m", prompt_tokens=300,
                     completion_tokens=100, cached_tokens=0, latency_s=0.5, cost_usd=1e-4, cloud_cost_usd=1e-4,
                     p_local=0.4, threshold=0.9, reason="predictor")


@pytest.fixture(scope="module")
def pg_url():
    try:
        cluster = PgCluster()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    yield cluster.new_database()
    cluster.close()


def steps(ledger, budget) -> float:
    t0 = time.perf_counter()
    for i in range(ROUNDS):
        over, hold = budget.reserve(f"s{i % 50}", 2e-4)
        assert over is None
        ledger.record(cloud_row(i), [("ok", 0.5)])
        budget.settle(f"s{i % 50}", hold, 1e-4)
    return (time.perf_counter() - t0) / ROUNDS * 1e6


def test_step_bookkeeping_sqlite_node(benchmark, tmp_path):
    ledger = Ledger(tmp_path / "l.sqlite")
    budget = Budget(per_day_usd=1e6, per_session_usd=1e6, ledger=ledger)
    us = benchmark.pedantic(steps, args=(ledger, budget), rounds=1, iterations=1)
    benchmark.extra_info["us_per_step"] = us
    ledger.close()


def test_step_bookkeeping_postgresql_fleet(benchmark, pg_url, tmp_path):
    from hera_core.routing.ledger_pg import PgBudget, PgLedger

    ledger = PgLedger(pg_url, node="bench", spool_path=tmp_path / "spool.jsonl")
    budget = PgBudget(ledger, per_day_usd=1e6, per_session_usd=1e6)
    us = benchmark.pedantic(steps, args=(ledger, budget), rounds=1, iterations=1)
    benchmark.extra_info["us_per_step"] = us
    ledger.close()
