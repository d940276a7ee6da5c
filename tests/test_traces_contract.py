"""The trace store's contract, one suite against both stores: the SQLite `TraceStore` of one node
and the `PgTraceStore` a fleet shares in its ledger's PostgreSQL database (a private server,
tests/pg.py; marked `fleet`). The learning loop reads the same from either; in a fleet every node
learns from the steps all nodes traced."""

from __future__ import annotations

from dataclasses import asdict

import pytest

from hera_core.routing.learning import label_pending
from hera_core.routing.traces import TraceStore
from tests.test_learning import feature_rows, row
from tests.test_ledger_contract import cluster  # noqa: F401 - the module's PostgreSQL server (a fixture)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.fleet)])
def make_store(request, tmp_path, cluster):  # noqa: F811
    """(max_rows, node) -> a store; stores made by one test share its database (its fleet)."""
    made, url = [], []

    def make(max_rows=50_000, node="node-a"):
        if request.param == "sqlite":
            store = TraceStore(tmp_path / "traces.sqlite", max_rows=max_rows)
        else:
            from hera_core.routing.traces_pg import PgTraceStore

            url or url.append(cluster().new_database())
            store = PgTraceStore(url[0], node=node, max_rows=max_rows)
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


def test_rows_come_back_field_for_field_in_order(make_store):
    store = make_store()
    calls = [{"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{\"a\": 1}"}}]
    added = [row(step=0, cloud="ANSWER: 4", draft="ANSWER: 4"), row(step=1, cloud="x", draft="y")]
    added[1].cloud_calls, added[1].draft_calls, added[1].ts = calls, calls, 1234.5
    ids = [store.add(r) for r in added]
    got = store.rows()
    assert [r.id for r in got] == ids and ids == sorted(ids)
    for want, have in zip(added, got):
        w, h = asdict(want), asdict(have)
        for key in ("id", "ts"):
            w.pop(key), h.pop(key)
        assert h == w
    assert got[1].ts == 1234.5 and got[0].ts > 0
    assert store.rows(since_id=ids[0]) == got[1:] and store.rows(kind="audit") == []


def test_labels_counts_and_the_bound(make_store):
    store = make_store(max_rows=5)
    ids = [store.add(row(draft="ANSWER: 4" if i % 2 else "ANSWER: 5")) for i in range(8)]
    assert [r.id for r in store.rows()] == ids[-5:]  # the oldest went first
    assert store.count() == 5 and store.count(labelled=False) == 5
    assert label_pending(store) == 5
    assert {r.id: r.label for r in store.rows(labelled=True)} == {i: int(k % 2 == 1) for k, i in enumerate(ids)
                                                                   if i in ids[-5:]}
    assert store.count(labelled=False) == 0 and store.rows(labelled=False) == []
    with pytest.raises(ValueError, match="max_rows"):
        make_store(max_rows=0)


def test_a_row_stored_before_the_answer_schema_size_reads_it_as_missing(make_store):
    """A store written by HERA before feature schema v3 holds 12-column rows: they come back in
    today's order with the answer schema's size missing (NaN: whether the step asked for one is
    not known), so the learner can still train on them."""
    import math

    from hera_core.routing.predictor import FEATURE_NAMES, V2_FEATURE_NAMES

    store = make_store()
    old = row()
    old.features = old.features[:len(V2_FEATURE_NAMES)]
    store.add(old)
    (got,) = store.rows()
    assert len(got.features) == len(FEATURE_NAMES) and math.isnan(got.features[-1])
    assert got.features[:-1] == old.features


@pytest.mark.fleet
def test_a_fleet_learns_from_every_nodes_traces(tmp_path, cluster):  # noqa: F811
    """Two nodes trace into the shared database; the learning loop of either reads both nodes' rows
    and learns a version from them."""
    from hera_core.routing.traces_pg import PgTraceStore

    url = cluster().new_database()
    a, b = PgTraceStore(url, node="node-a"), PgTraceStore(url, node="node-b")
    try:
        for i, feats in enumerate(feature_rows(200)):
            (a if i % 2 else b).add(row(features=feats, draft="ANSWER: 4" if feats[0] < 0.5 else "ANSWER: 5"))
        assert a.count() == b.count() == 200
        from hera_core.config import LearningSettings
        from hera_core.routing.learning import LiveLearner
        from hera_core.routing.predictor import Predictor

        learner = LiveLearner(LearningSettings(min_labels=30), tmp_path / "learn", Predictor.load(), store=a)
        event = learner.learn_now()
        assert event.version == "v1" and learner.status()["labelled_steps"] == 200
        assert len(b.rows(labelled=True)) == 200  # labelled once, seen by every node
    finally:
        a.close()
        b.close()
