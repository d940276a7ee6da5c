"""The PostgreSQL ledger shared by a fleet of nodes, against a real private PostgreSQL server."""

import json
import urllib.request

import psycopg
import pytest

from hera_core.errors import ConfigError
from hera_core.routing.ledger import Ledger, LedgerRow
from hera_core.routing.ledger_pg import SCHEMA_VERSION, PgLedger
from tests.pg import PgCluster

pytestmark = pytest.mark.fleet


@pytest.fixture(scope="module")
def cluster():
    try:
        c = PgCluster()
    except RuntimeError as exc:
        pytest.fail(str(exc))
    yield c
    c.close()


@pytest.fixture
def db(cluster):
    """A fresh database per test."""
    return cluster.new_database()


def row(i: int, route: str = "cloud", session: str = "s", run: str = "r", status: str = "ok") -> LedgerRow:
    return LedgerRow(run=run, session=f"{session}{i % 3}", step=i, route=route, model="m", prompt_tokens=10 + i,
                     completion_tokens=5, cached_tokens=i if route == "local" else 0, latency_s=0.1 * i,
                     cost_usd=0.001 * i if route == "cloud" else 1e-6 * i, cloud_cost_usd=0.001 * i, p_local=0.5,
                     threshold=0.9, reason="predictor", status=status, ts=1000.0 + i)


def test_the_same_rows_give_the_same_totals_as_sqlite(db, tmp_path):
    pg, lite = PgLedger(db, node="a"), Ledger(tmp_path / "l.sqlite")
    try:
        for i in range(12):
            r = row(i, route="local" if i % 2 else "cloud", status="cancelled" if i == 11 else "ok")
            attempts = [("503", 0.1), ("ok", 0.2)] if r.route == "cloud" else None
            pg.record(r, attempts)
            lite.record(row(i, route="local" if i % 2 else "cloud", status="cancelled" if i == 11 else "ok"),
                        attempts)
        assert pg.totals("r") == pytest.approx(lite.totals("r"))
        for a, b in zip(pg.sessions("r"), lite.sessions("r"), strict=True):
            assert a.pop("session") == b.pop("session") and a == pytest.approx(b)
        for a, b in zip(sorted(pg.cloud_spend(1005.0)), sorted(lite.cloud_spend(1005.0)), strict=True):
            assert a[0] == b[0] and a[1:] == pytest.approx(b[1:])
        assert len(pg.attempts("r")) == len(lite.attempts("r")) == 12
        assert [r["node"] for r in pg.rows("r")] == ["a"] * 12
    finally:
        pg.close()
        lite.close()


def test_a_row_delivered_twice_is_stored_once(db):
    pg = PgLedger(db, node="a")
    try:
        first = pg.record(row(1), [("ok", 0.1)], row_uid="7b5c7a4e-0000-4000-8000-000000000001")
        again = pg.record(row(1), [("ok", 0.1)], row_uid="7b5c7a4e-0000-4000-8000-000000000001")
        assert first == again and len(pg.rows()) == 1 and len(pg.attempts()) == 1
    finally:
        pg.close()


def test_nodes_share_one_ledger_and_each_row_names_its_node(db):
    nodes = [PgLedger(db, node=f"node-{k}") for k in range(3)]
    try:
        for k, node in enumerate(nodes):
            for i in range(k + 1):
                node.record(row(i, session=f"n{k}-"))
        view = nodes[0].per_node()
        assert [(v["node"], v["subtasks"]) for v in view] == [("node-0", 1), ("node-1", 2), ("node-2", 3)]
        assert nodes[2].totals()["subtasks"] == 6  # every node sees the fleet's totals
    finally:
        for n in nodes:
            n.close()


def test_schema_is_versioned_and_a_newer_one_is_refused(db):
    PgLedger(db, node="a").close()
    PgLedger(db, node="b").close()  # reopening migrates nothing twice
    with psycopg.connect(db, autocommit=True) as conn:
        assert conn.execute("SELECT version FROM hera_schema").fetchall() == [(SCHEMA_VERSION,)]
        conn.execute("UPDATE hera_schema SET version = %s", (SCHEMA_VERSION + 1,))
    with pytest.raises(ConfigError, match="upgrade HERA"):
        PgLedger(db, node="c")


def test_an_unreachable_database_is_a_config_error_without_the_password(cluster):
    from hera_core.serving.assembly import free_port

    url = f"postgresql://hera:s3cret-pw@127.0.0.1:{free_port()}/postgres"
    with pytest.raises(ConfigError) as err:
        PgLedger(url, connect_timeout_s=1)
    assert "ledger_url" in str(err.value) and "s3cret-pw" not in str(err.value)


def test_two_hera_nodes_book_into_one_ledger_and_each_shows_the_fleet(db, tiny_engine, cloud_url, tmp_path):
    from hera_core.backends.cloud import CloudEngine
    from hera_core.config import load_settings
    from hera_core.routing.predictor import Kappa
    from hera_core.routing.runtime import Runtime
    from hera_core.serving.assembly import open_ledger
    from hera_core.serving.server import create_app
    from tests.conftest import TINY, ServerThread
    from tests.factories import random_predictor

    servers = []
    for k in range(2):
        settings = load_settings(env={"HERA_LEDGER_URL": db, "HERA_NODE_ID": f"edge-{k}"},
                                 overrides={"max_tokens": 8})

        def make_app(settings=settings):
            rt = Runtime(tiny_engine, CloudEngine(cloud_url, TINY), random_predictor(kappa=Kappa(1.01, -1.02, 1)),
                         open_ledger(settings), settings.prices, run="fleet", max_tokens=8)
            return create_app(settings, runtime=rt)

        servers.append(ServerThread(make_app))
    try:
        for k, srv in enumerate(servers):
            for msgs in ([{"role": "user", "content": f"Hi {k}"}],
                         [{"role": "user", "content": f"Hi {k}"}, {"role": "assistant", "content": "Hello."},
                          {"role": "user", "content": "Bye."}]):
                req = urllib.request.Request(srv.url + "/v1/chat/completions", method="POST",
                                             data=json.dumps({"model": "hera", "messages": msgs}).encode(),
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=60) as r:
                    assert r.status == 200
        for srv in servers:
            with urllib.request.urlopen(srv.url + "/v1/hera/ledger?run=fleet", timeout=30) as r:
                view = json.loads(r.read())
            assert view["totals"]["subtasks"] == 4 and view["totals"]["local_subtasks"] == 2
            assert [(n["node"], n["subtasks"]) for n in view["nodes"]] == [("edge-0", 2), ("edge-1", 2)]
    finally:
        for srv in servers:
            srv.close()


def test_hera_ledger_shows_the_fleet(db):
    from tests.test_cli import hera

    for k in range(2):
        node = PgLedger(db, node=f"n{k}")
        node.record(row(k + 1))
        node.close()
    proc = hera("ledger", "--json", env={"HERA_LEDGER_URL": db})
    assert proc.returncode == 0, proc.stderr
    view = json.loads(proc.stdout)
    assert view["totals"]["subtasks"] == 2 and [n["node"] for n in view["nodes"]] == ["n0", "n1"]
    assert db.split("@")[0] not in proc.stderr


def cloud_row(session: str, usd: float) -> LedgerRow:
    return LedgerRow(run="b", session=session, step=0, route="cloud", model="m", prompt_tokens=1, completion_tokens=1,
                     cached_tokens=0, latency_s=0.01, cost_usd=usd, cloud_cost_usd=usd, p_local=None, threshold=None,
                     reason="predictor")


def test_four_nodes_never_overspend_a_shared_daily_cap(db):
    """4 nodes x 5 concurrent callers, each call holding its price before it runs and booking it
    after: the fleet's cloud spend stops at the cap (plus at most one call), though every node
    alone would have spent far more."""
    import threading
    import time

    from hera_core.routing.ledger_pg import PgBudget

    cap, price = 0.20, 0.01
    nodes = [PgLedger(db, node=f"n{k}", pool_size=6) for k in range(4)]
    budgets = [PgBudget(n, per_day_usd=cap) for n in nodes]
    admitted, refused = [], []

    def caller(k: int, c: int):
        for i in range(8):
            over, hold = budgets[k].reserve(f"s{k}-{c}", price)
            if over is not None:
                refused.append(over)
                continue
            time.sleep(0.01)  # the cloud call in flight
            nodes[k].record(cloud_row(f"s{k}-{c}", price))
            budgets[k].settle(f"s{k}-{c}", hold, price)
            admitted.append(1)

    threads = [threading.Thread(target=caller, args=(k, c)) for k in range(4) for c in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        spent = nodes[0].totals("b")["cloud_cost_usd"]
        assert cap - 1e-9 <= spent <= cap + price + 1e-9, spent
        assert len(admitted) == nodes[0].totals("b")["subtasks"] and set(refused) == {"daily"}
        assert budgets[1].exceeded("anyone") == "daily"
    finally:
        for n in nodes:
            n.close()


def test_a_session_cap_holds_across_nodes_and_a_dead_nodes_hold_expires(db):
    import time

    from hera_core.routing.ledger_pg import PgBudget

    a, b = PgLedger(db, node="a"), PgLedger(db, node="b")
    try:
        ba, bb = PgBudget(a, per_session_usd=0.05, hold_ttl_s=0.5), PgBudget(b, per_session_usd=0.05, hold_ttl_s=0.5)
        over, hold = ba.reserve("s", 0.05)  # node a holds the whole session cap, then dies
        assert over is None
        assert bb.reserve("s", 0.01)[0] == "session"  # node b sees a's hold
        assert bb.reserve("other", 0.01)[0] is None  # another session is not affected
        time.sleep(0.6)
        over, hold2 = bb.reserve("s", 0.01)  # a's hold has expired
        assert over is None
        b.record(cloud_row("s", 0.05))
        bb.settle("s", hold2, 0.05)
        assert ba.reserve("s", 0.01)[0] == "session"  # booked spend counts on every node
    finally:
        a.close()
        b.close()


def test_runtimes_on_two_nodes_share_the_daily_cap(db, tiny_engine, cloud_url):
    from hera_core.backends.cloud import CloudEngine
    from hera_core.config import load_settings
    from hera_core.routing.ledger_pg import PgBudget
    from hera_core.routing.predictor import Kappa
    from hera_core.routing.runtime import Runtime
    from tests.conftest import TINY, run
    from tests.factories import random_predictor

    prices = load_settings(env={}).prices
    ledgers = [PgLedger(db, node=f"n{k}") for k in range(2)]
    rts = [Runtime(tiny_engine, CloudEngine(cloud_url, TINY), random_predictor(kappa=Kappa(1.01, 0.0, 0)), lg, prices,
                   run="cap", max_tokens=8, budget=PgBudget(lg, per_day_usd=1e-9)) for lg in ledgers]
    try:
        first = run(rts[0].complete([{"role": "user", "content": "Hi"}], session="a"))
        second = run(rts[1].complete([{"role": "user", "content": "Hello"}], session="b"))
        assert first.route.value == "cloud" and first.cloud_cost_usd > 1e-9
        assert second.route.value == "local" and second.decision.reason == "budget-daily"  # node a's spend counts
        with psycopg.connect(db) as conn:
            assert conn.execute("SELECT COUNT(*) FROM budget_holds").fetchone()[0] == 0  # every hold settled
    finally:
        for rt in rts:
            run(rt.cloud.close())
        for lg in ledgers:
            lg.close()


def test_a_node_that_loses_the_database_spools_and_delivers_once(cluster, tmp_path):
    """The database goes down: rows are spooled (fsynced) and the step still answers; the budget
    cannot be checked, so cloud steps are refused; once it is back, the next booking delivers the
    spool in order, each row once, even if a delivery is repeated."""
    from hera_core.routing.ledger_pg import PgBudget

    db = cluster.new_database()
    spool = tmp_path / "spool.jsonl"
    node = PgLedger(db, node="edge", spool_path=spool, connect_timeout_s=1, retry_after_s=0.2)
    budget = PgBudget(node, per_day_usd=10.0)
    try:
        node.record(row(1))
        cluster.stop("immediate")
        try:
            assert node.record(row(2), [("ok", 0.1)]) == 0 and node.record(row(3)) == 0
            assert node.spooled() == 2
            assert budget.reserve("s", 0.01) == ("unchecked", None)
            assert PgBudget(node, per_day_usd=10.0, when_unreachable="allow").reserve("s", 0.01) == (None, None)
            saved = spool.read_text()
        finally:
            cluster.start()
        import time

        node.record(row(4))  # delivered after the spool, or spooled behind it while the pool reconnects
        deadline = time.time() + 30
        while node.spooled():
            assert time.time() < deadline, "the spool was not delivered within 30 s of the restart"
            time.sleep(0.3)
            try:
                node.deliver_spool()
            except Exception:  # noqa: BLE001 - still reconnecting
                pass
        spool.write_text(saved)  # a crash between delivery and emptying the spool: delivered again
        assert node.deliver_spool() == 2
        steps = [r["step"] for r in node.rows("r")]
        assert steps == [1, 2, 3, 4] and len(node.attempts("r")) == 1
    finally:
        node.close()


def test_without_a_spool_an_unreachable_database_is_an_error(cluster):
    node = PgLedger(cluster.new_database(), node="x", connect_timeout_s=1)
    try:
        cluster.stop("immediate")
        with pytest.raises(ConfigError, match="no spool"):
            node.record(row(1))
    finally:
        cluster.start()
        node.close()


def test_four_hera_serve_nodes_x_50_clients_keep_a_shared_cap_and_lose_no_row(db, tiny_model_path, tmp_path):
    """4 `hera serve` processes on one PostgreSQL ledger, 50 concurrent clients each (cloud steps
    against a fast scripted upstream), a daily cap worth about 100 calls, budget_action refuse:
    the fleet's spend stops at the cap (over it by less than the calls in flight), every answered
    step is one row, and no row is booked twice."""
    import asyncio
    import os
    import subprocess
    import sys

    import aiohttp

    from hera_core.config import load_settings
    from hera_core.serving.assembly import free_port
    from tests.conftest import TINY, ServerThread, run
    from tests.fake_upstream import FakeUpstream
    from tests.processes import wait_for_http

    fake = FakeUpstream(delay_s=0.02)
    up = ServerThread(fake.app)
    per_call = load_settings(env={}).prices.cloud_cost(11, 4)  # the fake upstream's usage per answer
    cap = 100 * per_call
    procs, urls = [], []
    try:
        for k in range(4):
            port = free_port()
            cfg = tmp_path / f"node{k}.toml"
            cfg.write_text(f'max_tokens = 4\n[local]\nmodel = "{TINY}"\nn_ctx = 1024\n'
                           f'[cloud]\nbase_url = "{up.url}/v1"\nmodel = "fake-model"\n'
                           f'[server]\nport = {port}\napi_keys = []\nmax_concurrency = 500\n'
                           f'daily_budget_usd = {cap!r}\nbudget_action = "refuse"\n')
            env = {**os.environ, "HERA_LEDGER_URL": db, "HERA_NODE_ID": f"node-{k}",
                   "HERA_CACHE_DIR": str(tmp_path / f"cache{k}")}
            os.makedirs(tmp_path / f"cache{k}" / "models", exist_ok=True)
            for f in tiny_model_path.parent.glob(tiny_model_path.stem + ".*"):  # the model and its checksum
                os.symlink(f, tmp_path / f"cache{k}" / "models" / f.name)
            procs.append(subprocess.Popen([sys.executable, "-m", "hera_core.cli", "--config", str(cfg), "serve"],
                                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            urls.append(f"http://127.0.0.1:{port}")
        for proc, url in zip(procs, urls):
            wait_for_http(url + "/healthz", proc, timeout_s=120)
        answered, refused, other, statuses = [], [], [], {}

        async def client(http, url, c):
            for i in range(5):
                body = {"model": "hera", "messages": [{"role": "user", "content": f"request {c}-{i}"}]}
                async with http.post(url + "/v1/chat/completions", json=body,
                                     headers={"X-Hera-Policy": "cloud-only", "X-Hera-Session": f"{url}-{c}"}) as r:
                    data = await r.json()
                    (answered if r.status == 200 else refused if r.status == 429 else other).append(data)
                    statuses.setdefault(url, []).append(r.status)

        async def load():
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
                await asyncio.gather(*[client(http, url, c) for url in urls for c in range(50)])

        run(load())
        ledger = PgLedger(db, node="reader")
        try:
            rows = [r for r in ledger.rows() if r["status"] == "ok"]
            spent = sum(r["cost_usd"] for r in rows)
            assert not other, other[:3]
            assert len(rows) == len(answered) and len({r["row_uid"] for r in rows}) == len(rows)
            assert len({r["node"] for r in rows}) >= 2  # the cap was spent by several nodes together
            assert all(429 in codes for codes in statuses.values())  # and every node stopped at it
            assert refused and all(e["error"]["type"] for e in refused)
            in_flight = 4 * 50  # at most one call per client at a time
            assert cap <= spent + per_call and spent < cap + in_flight * per_call, (spent / per_call, cap / per_call)
            print(f"fleet: {len(answered)} answered, {len(refused)} refused, spend {spent / per_call:.0f} calls "
                  f"for a cap of {cap / per_call:.0f}")
        finally:
            ledger.close()
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=20)
        up.close()
