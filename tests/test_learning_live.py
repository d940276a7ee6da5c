"""The learning loop wired into the runtime and the server (docs/learning.md): shadow drafts of
cloud-routed steps traced and labelled, audits of local steps, predictor versions on every ledger
row, automatic rollback, the per-request opt-out. A real SLM in process, a real model over HTTP as
the cloud, a real SQLite ledger and trace store; the scripted upstream only where a regression is
injected (the cloud's answers change)."""

from __future__ import annotations

import asyncio

import pytest

from hera_core.backends.cloud import CloudEngine
from hera_core.config import LearningSettings, load_settings
from hera_core.routing.learning import LiveLearner
from hera_core.routing.ledger import Ledger
from hera_core.routing.policy import Override, Route
from hera_core.routing.predictor import Kappa
from hera_core.routing.runtime import Runtime
from hera_core.serving.assembly import attach_learning
from tests.conftest import TINY, ServerThread, run
from tests.factories import random_predictor

ALL_CLOUD = Kappa(base=1.01)  # no P reaches it: every scored step goes to the cloud
ALL_LOCAL = Kappa(base=-0.01)


def question(i: int) -> list[dict]:
    return [{"role": "system", "content": "You are a terse calculator agent."},
            {"role": "user", "content": f"What is {i} + {i}? Answer with the number."}]


@pytest.fixture
def learning_runtime(tiny_engine, cloud_url, tmp_path):
    """A runtime that routes every step to the cloud, with the learning loop attached."""
    made = []

    def make(kappa=ALL_CLOUD, cloud=None, **learn_kw):
        ledger = Ledger(tmp_path / "ledger.sqlite")
        cloud = cloud or CloudEngine(cloud_url, TINY)
        learner = LiveLearner(LearningSettings(shadow=True, **learn_kw), tmp_path / "learning",
                              random_predictor(kappa=kappa))
        rt = Runtime(tiny_engine, cloud, learner.predictor(), ledger, load_settings(env={}).prices, run="t",
                     max_tokens=16)
        attach_learning(rt, learner)
        made.append((rt, ledger, cloud))
        return rt

    yield make
    for rt, ledger, cloud in made:
        run(rt.learning.close())
        run(cloud.close())
        ledger.close()


def test_cloud_steps_get_shadow_drafts_traced_labelled_and_booked(learning_runtime):
    rt = learning_runtime()

    async def go():
        results = [await rt.complete(question(i), session=f"s{i}", step=0) for i in range(3)]
        await rt.learning.drain()
        return results

    results = run(go())
    assert {r.route for r in results} == {Route.CLOUD}
    status = rt.learning.status()
    assert status["stats"]["shadow_started"] == 3 and status["stats"]["shadow_done"] == 3
    assert status["traced_steps"] == 3 and status["labelled_steps"] == 3
    rows = rt.learning.learner.store.rows()
    assert {r.kind for r in rows} == {"shadow"} and {r.session for r in rows} == {"s0", "s1", "s2"}
    assert all(len(r.features) > 0 and r.draft_text and r.cloud_text for r in rows)
    ledger_rows = rt.ledger.rows("t")
    served = [r for r in ledger_rows if r["status"] == "ok"]
    shadows = [r for r in ledger_rows if r["status"] == "shadow"]
    assert len(served) == 3 and {r["route"] for r in served} == {"cloud"}
    assert {r["predictor_version"] for r in served} == {"v0"} == {r["predictor_version"] for r in shadows}
    assert len(shadows) == 3 and all(r["route"] == "local" and r["cost_usd"] > 0 and r["cloud_cost_usd"] == 0
                                     for r in shadows)
    totals = rt.ledger.totals("t")
    # the shadows' device time is spend (off the saving), never a served subtask nor a failure
    assert totals["subtasks"] == 3 and totals["failed_calls"] == 0 and totals["local_subtasks"] == 0
    assert totals["learning_cost_usd"] == pytest.approx(sum(r["cost_usd"] for r in shadows))
    assert totals["saving_usd"] == pytest.approx(-totals["learning_cost_usd"])


def test_no_trace_for_a_request_that_opts_out_nor_for_a_local_only_step(learning_runtime):
    rt = learning_runtime()

    async def go():
        await rt.complete(question(1), session="a", step=0, trace=False)
        await rt.complete(question(2), session="b", step=0, override=Override.LOCAL_ONLY)
        await rt.learning.drain()

    run(go())
    assert rt.learning.status()["traced_steps"] == 0
    assert {r["status"] for r in rt.ledger.rows("t")} == {"ok"}


def test_shadows_never_fail_a_client_under_load_and_give_way_to_client_steps(learning_runtime):
    """Eight sessions at once, half of them answered by the SLM: every request is answered, and
    every cloud step's shadow either ran, was skipped (the SLM busy), or was cancelled by a client."""
    rt = learning_runtime()

    async def session(i):
        override = Override.LOCAL_ONLY if i % 2 else Override.AUTO
        return [await rt.complete(question(10 * i + k), session=f"load{i}", step=0, override=override)
                for k in range(2)]

    async def go():
        out = await asyncio.gather(*(session(i) for i in range(8)))
        await rt.learning.drain()
        return [r for rs in out for r in rs]

    results = run(go())
    assert len(results) == 16 and all(r.text is not None for r in results)
    stats = {k: 0 for k in ("shadow_started", "shadow_skipped_busy", "shadow_done", "shadow_given_up", "errors")}
    stats.update(rt.learning.status()["stats"])
    cloud_steps = sum(r.route is Route.CLOUD for r in results)
    assert cloud_steps == 8
    assert stats["shadow_started"] + stats["shadow_skipped_busy"] == cloud_steps
    assert stats["shadow_done"] + stats["shadow_given_up"] == stats["shadow_started"]
    assert stats["shadow_done"] > 0 and stats["errors"] == 0  # the SLM's idle moments between steps are used
    assert rt.learning.status()["traced_steps"] == stats["shadow_done"]


def test_a_client_step_on_the_slm_cancels_a_decoding_shadow_which_starts_over_when_idle(learning_runtime):
    rt = learning_runtime()

    async def go():
        shadow = rt.learning.start_shadow(question(5), max_tokens=64, stop=None)
        while not rt.learning.status()["stats"].get("shadow_decodes"):
            await asyncio.sleep(0.001)  # until it decodes on the SLM
        client = await rt.complete(question(6), session="c", step=0, override=Override.LOCAL_ONLY)
        return await shadow, client

    draft, client = run(go())
    assert client.route is Route.LOCAL and client.text
    stats = rt.learning.status()["stats"]
    assert stats["shadow_cancelled"] == 1 and stats["shadow_decodes"] == 2  # cancelled once, then decoded again
    assert draft is not None and draft.text


def test_a_swapped_predictor_names_the_rows_it_decides(learning_runtime):
    rt = learning_runtime()
    learner = rt.learning.learner
    v1 = learner.versions.promote(random_predictor(seed=1, kappa=ALL_LOCAL))
    rt.learning.on_swap(learner.versions.load(v1), "test")

    async def go():
        r = await rt.complete(question(3), session="v", step=0)
        await rt.learning.drain()
        return r

    r = run(go())
    assert r.route is Route.LOCAL and rt.predictor_version == "v1"
    assert [r["predictor_version"] for r in rt.ledger.rows("t") if r["status"] == "ok"][-1] == "v1"


def test_an_injected_regression_is_rolled_back_by_the_audit(learning_runtime):
    """v1 keeps every step local; every one is audited (audit_share 1). The cloud's answers then
    change (the scripted upstream answers something else): audited agreement falls, and after
    min_audits audits HERA is back on v0 by itself, its rows and the audits' cloud calls booked."""
    from tests.fake_upstream import FakeUpstream

    upstream = ServerThread(FakeUpstream().app)
    try:
        rt = learning_runtime(cloud=CloudEngine(upstream.url + "/v1", "changed-cloud"), audit_share=1.0,
                              min_audits=5, target_agreement=0.9)
        learner = rt.learning.learner
        rt.learning.on_swap(learner.versions.load(learner.versions.promote(random_predictor(kappa=ALL_LOCAL))), "t")

        async def go():
            routes = []
            for i in range(8):
                r = await rt.complete(question(i), session=f"r{i}", step=0)
                routes.append((r.route, [row for row in rt.ledger.rows("t") if row["status"] == "ok"][-1][
                    "predictor_version"]))
                await rt.learning.drain()  # the audit is labelled before the next step (bounded: it counts)
            return routes

        routes = run(go())
    finally:
        upstream.close()
    assert routes[:5] == [(Route.LOCAL, "v1")] * 5
    assert rt.predictor_version == "v0" and learner.versions.current == "v0"
    assert routes[5:] == [(Route.CLOUD, "v0")] * 3  # v0 (kappa 1.01) sends them to the cloud again
    assert learner.status()["events"][-1]["event"] == "rolled back"
    audits = [r for r in rt.ledger.rows("t") if r["status"] == "audit"]
    assert len(audits) == 5 and all(r["route"] == "cloud" and r["cost_usd"] > 0 and r["predictor_version"] == "v1"
                                    for r in audits)


def test_server_honours_the_trace_header_and_reports_learning(learning_runtime, tmp_path):
    import requests

    from hera_core.serving.server import create_app

    rt = learning_runtime()
    settings = load_settings(env={}, overrides={"cache_dir": str(tmp_path)})
    srv = ServerThread(lambda: create_app(settings, runtime=rt))
    try:
        body = {"model": "hera", "messages": question(4), "max_tokens": 8}
        url = srv.url + "/v1/chat/completions"
        bad = requests.post(url, json=body, headers={"X-Hera-Trace": "maybe"}, timeout=60)
        assert bad.status_code == 400 and "X-Hera-Trace" in bad.json()["error"]["message"]
        off = requests.post(url, json=body, headers={"X-Hera-Trace": "off"}, timeout=60)
        assert off.status_code == 200 and off.json()["hera"]["predictor_version"] == "v0"
        srv.call(rt.learning.drain())
        assert rt.learning.status()["traced_steps"] == 0
        on = requests.post(url, json=body, timeout=60)
        assert on.status_code == 200
        srv.call(rt.learning.drain())
        status = requests.get(srv.url + "/v1/hera/learning", timeout=10).json()
        assert status["enabled"] and status["current"] == "v0" and status["traced_steps"] == 1
        metrics = requests.get(srv.url + "/metrics", timeout=10).text
        assert 'hera_learning_steps{kind="shadow_done"} 1.0' in metrics
        assert 'hera_predictor_in_use{version="v0"} 1.0' in metrics
    finally:
        srv.close()


def test_learning_is_off_by_default_and_the_endpoint_says_how_to_turn_it_on(tiny_engine, cloud_url, tmp_path):
    import requests

    from hera_core.serving.server import create_app

    ledger = Ledger(tmp_path / "ledger.sqlite")
    cloud = CloudEngine(cloud_url, TINY)
    rt = Runtime(tiny_engine, cloud, random_predictor(kappa=ALL_CLOUD), ledger, load_settings(env={}).prices)
    srv = ServerThread(lambda: create_app(load_settings(env={}), runtime=rt))
    try:
        status = requests.get(srv.url + "/v1/hera/learning", timeout=10).json()
        assert status["enabled"] is False and "learning.shadow" in status["hint"]
        assert status["predictor_version"].startswith("sha-")
    finally:
        srv.close()
        run(cloud.close())
        ledger.close()
