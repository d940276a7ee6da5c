"""What a shared fleet ledger adds to a cloud step: booking a row and holding / settling the budget
on a private PostgreSQL server (on this machine, over 127.0.0.1), against the single node's SQLite
file and in-memory caps, in one run.

extra_info: us_per_step (mean over the rounds); the PostgreSQL case also runs SQLite in alternating
blocks and reports ratio_vs_sqlite, which `make bench-compare` checks (bench/compare.py).
Smoke mode (HERA_BENCH_SMOKE=1): 30 steps (not 1,000), and 100 cloud steps from 20 clients
through 1 and 2 nodes.
"""

from __future__ import annotations

import statistics
import time

import pytest

from bench.support import sized, skip_in_smoke
from hera_core.routing.budget import Budget
from hera_core.routing.ledger import Ledger, LedgerRow
from tests.pg import PgCluster

ROUNDS = sized(1000, 30)


def cloud_row(i: int) -> LedgerRow:
    return LedgerRow(run="bench", session=f"s{i % 50}", step=i, route="cloud", model="m", prompt_tokens=300,
                     completion_tokens=100, cached_tokens=0, latency_s=0.5, cost_usd=1e-4, cloud_cost_usd=1e-4,
                     p_local=0.4, threshold=0.9, reason="predictor")


@pytest.fixture(scope="module")
def pg_url():
    try:
        cluster = PgCluster()
    except RuntimeError as exc:
        pytest.fail(str(exc))  # never a skip: the test extra brings the server
    yield cluster.new_database()
    cluster.close()


def steps(ledger, budget, rounds: int = ROUNDS, first: int = 0) -> float:
    """Mean microseconds per step over `rounds` steps (numbered from `first`)."""
    t0 = time.perf_counter()
    for i in range(first, first + rounds):
        over, hold = budget.reserve(f"s{i % 50}", 2e-4)
        assert over is None
        ledger.record(cloud_row(i), [("ok", 0.5)])
        budget.settle(f"s{i % 50}", hold, 1e-4)
    return (time.perf_counter() - t0) / rounds * 1e6


def test_step_bookkeeping_sqlite_node(benchmark, tmp_path):
    ledger = Ledger(tmp_path / "l.sqlite")
    budget = Budget(per_day_usd=1e6, per_session_usd=1e6, ledger=ledger)
    us = benchmark.pedantic(steps, args=(ledger, budget), rounds=1, iterations=1)
    benchmark.extra_info["us_per_step"] = us
    ledger.close()


BLOCK = sized(50, 10)  # steps per block of the paired measurement


def test_step_bookkeeping_postgresql_fleet(benchmark, pg_url, tmp_path):
    """The PostgreSQL ledger and budget, in blocks of BLOCK steps alternating with blocks on a
    SQLite ledger (the same machine load on both sides). extra_info: us_per_step (PostgreSQL),
    sqlite_us_per_step, ratio_vs_sqlite (median block time over median block time)."""
    from hera_core.routing.ledger_pg import PgBudget, PgLedger

    ledger = PgLedger(pg_url, node="bench", spool_path=tmp_path / "spool.jsonl")
    budget = PgBudget(ledger, per_day_usd=1e6, per_session_usd=1e6)
    local = Ledger(tmp_path / "l.sqlite")
    local_budget = Budget(per_day_usd=1e6, per_session_usd=1e6, ledger=local)
    blocks: dict[str, list[float]] = {"pg": [], "sqlite": []}

    def paired() -> None:
        for first in range(0, ROUNDS, BLOCK):
            blocks["sqlite"].append(steps(local, local_budget, BLOCK, first))
            blocks["pg"].append(steps(ledger, budget, BLOCK, first))

    benchmark.pedantic(paired, rounds=1, iterations=1)
    pg, lite = statistics.median(blocks["pg"]), statistics.median(blocks["sqlite"])
    benchmark.extra_info.update(us_per_step=statistics.mean(blocks["pg"]),
                                sqlite_us_per_step=statistics.mean(blocks["sqlite"]),
                                ratio_vs_sqlite=round(pg / lite, 3))
    ledger.close()
    local.close()


# --- fleet throughput: cloud steps per second through `hera serve` nodes -----------------------
CLIENTS, REQUESTS = sized((100, 1500), (20, 100))


@pytest.fixture(scope="module")
def upstream():
    from tests.conftest import ServerThread
    from tests.fake_upstream import FakeUpstream

    up = ServerThread(FakeUpstream(delay_s=0.05).app)  # a provider answering in 50 ms
    yield up.url
    up.close()


def drive(urls: list[str]) -> dict:
    """CLIENTS concurrent clients, spread over the nodes, REQUESTS cloud steps in all."""
    import asyncio

    import aiohttp
    import numpy as np

    latencies: list[float] = []
    left = iter(range(REQUESTS))

    async def client(http, url):
        for i in left:
            t0 = time.perf_counter()
            body = {"model": "hera", "messages": [{"role": "user", "content": f"step {i}"}]}
            async with http.post(url + "/v1/chat/completions", json=body,
                                 headers={"X-Hera-Policy": "cloud-only", "X-Hera-Session": f"s{i % 50}"}) as r:
                assert r.status == 200, await r.text()
                await r.read()
            latencies.append(time.perf_counter() - t0)

    async def load():
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            await asyncio.gather(*[client(http, urls[c % len(urls)]) for c in range(CLIENTS)])

    t0 = time.perf_counter()
    asyncio.run(load())
    wall = time.perf_counter() - t0
    return {"steps_per_s": REQUESTS / wall, "latency_p50_ms": float(np.percentile(latencies, 50) * 1e3),
            "latency_p99_ms": float(np.percentile(latencies, 99) * 1e3)}


@pytest.mark.parametrize("ledger,nodes", [("sqlite", 1), ("postgresql", 1), ("postgresql", 2), ("postgresql", 4)],
                         ids=["sqlite-1node", "postgresql-1node", "postgresql-2nodes", "postgresql-4nodes"])
def test_fleet_throughput(benchmark, ledger, nodes, pg_url, upstream, tmp_path):
    """Cloud steps per second through `hera serve` (a daily cap set, so every step holds, books and
    settles its budget), one node on its SQLite file against 1, 2 and 4 nodes on the shared ledger."""
    from hera_core.install.models import model_path
    from tests.conftest import TINY
    from tests.fleet import start_fleet

    if nodes > 2:
        skip_in_smoke("4 nodes are 2 more `hera serve` processes than the 2-node case, nothing else")

    model = model_path(TINY)
    fleet = start_fleet(nodes, tmp_path, model, upstream, ledger_url=pg_url if ledger == "postgresql" else None,
                        server_toml="daily_budget_usd = 1000000.0")
    try:
        drive([n.url for n in fleet.nodes])  # warm-up: connections, pools, first requests
        info = benchmark.pedantic(drive, args=([n.url for n in fleet.nodes],), rounds=1, iterations=1)
        benchmark.extra_info.update(info)
    finally:
        fleet.close()
