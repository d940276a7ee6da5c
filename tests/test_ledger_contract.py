"""The `CostLedger` contract, one suite run against both ledgers: the SQLite `Ledger` of one node and
the PostgreSQL `PgLedger` of a fleet (on a private PostgreSQL server, tests/pg.py; marked `fleet`).
Whatever the runtime, the budget, the server and `hera ledger` read must read the same from either."""

from __future__ import annotations

from dataclasses import asdict, fields

import pytest

from hera_core.routing.ledger import CostLedger, Ledger, LedgerRow
from tests.pg import PgCluster


@pytest.fixture(scope="module")
def cluster(request):
    """One PostgreSQL server for the module, started only when a PostgreSQL case runs."""
    holder: list[PgCluster] = []

    def get() -> PgCluster:
        if not holder:
            try:
                holder.append(PgCluster())
            except RuntimeError as exc:
                pytest.fail(str(exc))
        return holder[0]

    yield get
    if holder:
        holder[0].close()


@pytest.fixture(params=["sqlite", "sqlite-commit", pytest.param("postgresql", marks=pytest.mark.fleet)])
def ledger(request, tmp_path, cluster):
    if request.param.startswith("sqlite"):  # the default durability (a writer thread), and answer-after-commit
        led = Ledger(tmp_path / "ledger.sqlite", durability="commit" if request.param == "sqlite-commit" else "async")
    else:
        from hera_core.routing.ledger_pg import PgLedger

        led = PgLedger(cluster().new_database(), node="node-a")
    yield led
    led.close()


def row(**kw) -> LedgerRow:
    base = dict(run="r", session="s", step=0, route="cloud", model="m", prompt_tokens=100, completion_tokens=10,
                cached_tokens=0, latency_s=0.5, cost_usd=0.002, cloud_cost_usd=0.002, p_local=0.3, threshold=0.6,
                reason="predictor", ts=1000.0)
    base.update(kw)
    return LedgerRow(**base)


def test_both_ledgers_implement_the_protocol(ledger):
    assert isinstance(ledger, CostLedger)
    assert ledger.remote is (type(ledger).__name__ == "PgLedger")  # bookings over the network: off the loop


def test_rows_come_back_field_for_field_in_booking_order(ledger):
    booked = [row(step=0), row(step=1, route="local", cost_usd=1e-6, cached_tokens=64, p_local=None, threshold=None,
                               predictor_version="v2"),
              row(run="other", session="t", reason="local-only", status="cancelled")]
    ids = [ledger.record(r) for r in booked]
    assert all(i > 0 for i in ids) and ids == sorted(ids) and len(set(ids)) == 3
    got = ledger.rows()
    assert [g["id"] for g in got] == ids
    for g, b in zip(got, booked, strict=True):
        assert {f.name: g[f.name] for f in fields(LedgerRow)} == asdict(b)
    assert [g["id"] for g in ledger.rows("other")] == [ids[2]]
    assert ledger.rows("nobody") == []


def test_a_row_without_a_time_is_stamped(ledger):
    ledger.record(row(ts=0.0))
    assert ledger.rows()[0]["ts"] > 0.0


def test_attempts_are_numbered_per_subtask_and_filtered_by_run(ledger):
    ledger.record(row(step=0), [("503", 0.25), ("ok", 0.5)])
    ledger.record(row(step=1, run="other"), [("ClientConnectorError", 0.125)])
    ledger.record(row(step=2, route="local"))
    got = [(a["run"], a["step"], a["attempt"], a["outcome"], a["latency_s"]) for a in ledger.attempts()]
    assert got == [("r", 0, 1, "503", 0.25), ("r", 0, 2, "ok", 0.5), ("other", 1, 1, "ClientConnectorError", 0.125)]
    assert [a["outcome"] for a in ledger.attempts("r")] == ["503", "ok"]


def test_a_booking_that_fails_stores_nothing(ledger):
    """One transaction per subtask: an attempt the database refuses (no outcome) takes its row with it."""
    with pytest.raises(Exception):  # noqa: B017 - sqlite3 and psycopg name the violated constraint differently
        ledger.record(row(), [("ok", 0.1), (None, 0.2)])
    assert ledger.rows() == [] and ledger.attempts() == []
    ledger.record(row(step=1))  # and the ledger still books
    assert len(ledger.rows()) == 1


def test_empty_totals(ledger):
    t = ledger.totals()
    assert t["subtasks"] == 0 and t["local_share"] == 0.0 and t["cost_usd"] == 0 and t["saving_usd"] == 0
    assert ledger.sessions() == [] and ledger.cloud_spend(0.0) == []


def test_totals_count_served_steps_and_keep_failures_cancellations_and_learning_apart(ledger):
    ledger.record(row(session="a", step=0, route="cloud", cost_usd=0.002, cloud_cost_usd=0.002, prompt_tokens=100,
                      completion_tokens=10))
    ledger.record(row(session="a", step=1, route="local", cost_usd=0.0001, cloud_cost_usd=0.003, prompt_tokens=200,
                      completion_tokens=20, cached_tokens=150))
    ledger.record(row(session="b", step=0, route="local", cost_usd=0.0001, cloud_cost_usd=0.001, prompt_tokens=50,
                      completion_tokens=5, cached_tokens=10))
    ledger.record(row(session="b", step=1, route="cloud", cost_usd=0.0, status="CloudUnavailableError"))
    ledger.record(row(session="b", step=2, route="local", cost_usd=0.0, status="cancelled"))
    ledger.record(row(session="a", step=0, route="cloud", cost_usd=0.004, cloud_cost_usd=0.004, status="audit"))
    ledger.record(row(session="a", step=0, route="local", cost_usd=0.0002, cloud_cost_usd=0.0, status="shadow"))
    ledger.record(row(run="other", cost_usd=5.0, cloud_cost_usd=5.0))
    t = ledger.totals("r")
    assert t == pytest.approx({
        "subtasks": 3, "failed_calls": 1, "cancelled": 1, "local_subtasks": 2, "local_share": 2 / 3,
        "cost_usd": 0.0022, "cloud_cost_usd": 0.002, "all_cloud_cost_usd": 0.006, "learning_cost_usd": 0.0042,
        "saving_usd": 0.006 - 0.0022 - 0.0042, "prompt_tokens": 350, "completion_tokens": 35, "cached_tokens": 160})
    assert ledger.totals()["subtasks"] == 4  # every run


def test_sessions_in_order_of_their_first_row(ledger):
    ledger.record(row(session="b", route="local", cost_usd=0.0001, cloud_cost_usd=0.001))
    ledger.record(row(session="a", cost_usd=0.002, cloud_cost_usd=0.002))
    ledger.record(row(session="b", step=1, cost_usd=0.003, cloud_cost_usd=0.003))
    ledger.record(row(session="c", status="cancelled"))  # no served step: not listed
    ledger.record(row(session="z", run="other"))
    got = ledger.sessions("r")
    assert [s["session"] for s in got] == ["b", "a"]
    assert got[0] == pytest.approx({"session": "b", "subtasks": 2, "local_subtasks": 1, "cost_usd": 0.0031,
                                    "all_cloud_cost_usd": 0.004})


def test_per_node_adds_up_to_the_totals(ledger):
    for i in range(4):
        ledger.record(row(step=i, route="local" if i % 2 else "cloud", cost_usd=0.001 * (i + 1),
                          cloud_cost_usd=0.002 * (i + 1)))
    nodes, t = ledger.per_node("r"), ledger.totals("r")
    assert len(nodes) == 1 and isinstance(nodes[0]["node"], str)
    assert {k: nodes[0][k] for k in ("subtasks", "local_subtasks", "cost_usd", "all_cloud_cost_usd")} == \
        pytest.approx({k: t[k] for k in ("subtasks", "local_subtasks", "cost_usd", "all_cloud_cost_usd")})


def test_cloud_spend_per_session_all_time_and_since(ledger):
    ledger.record(row(session="a", cost_usd=0.001, ts=100.0))
    ledger.record(row(session="a", cost_usd=0.002, ts=200.0))
    ledger.record(row(session="a", route="local", cost_usd=0.5, ts=300.0))  # local spend is no cloud spend
    ledger.record(row(session="b", cost_usd=0.004, ts=50.0))
    got = sorted(ledger.cloud_spend(since=150.0))
    assert [s for s, _, _ in got] == ["a", "b"]
    assert [x[1:] for x in got] == [pytest.approx((0.003, 0.002)), pytest.approx((0.004, 0.0))]
