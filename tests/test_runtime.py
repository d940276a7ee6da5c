"""End to end: a real SLM in process, a real model over HTTP as the cloud, a real SQLite ledger."""

import pytest

from hera_core.config import load_settings
from hera_core.backends.cloud import CloudEngine
from hera_core.offline.harness import run_task
from hera_core.routing.ledger import Ledger
from hera_core.routing.policy import Override, Route
from hera_core.routing.predictor import Kappa
from hera_core.routing.runtime import Runtime, step_index
from hera_core.offline.workloads import make_tasks
from tests.conftest import TINY, run
from tests.factories import random_predictor

# kappa(0) = 1.01 sends step 0 to the cloud whatever P is; kappa(k >= 1) = -0.01 keeps later steps
# local: both routes in one session, through the real scoring path.
SPLIT = Kappa(base=1.01, per_step=-1.02, max_steps=1)


@pytest.fixture
def runtime(tiny_engine, cloud_url, tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    cloud = CloudEngine(cloud_url, TINY)
    rt = Runtime(tiny_engine, cloud, random_predictor(kappa=SPLIT), ledger, load_settings(env={}).prices,
                 run="t", max_tokens=48)
    yield rt
    run(cloud.close())
    ledger.close()


def test_agent_tasks_write_ledger_rows_with_both_routes(runtime):
    tasks = make_tasks(["basic_arithmetic", "letter_counting"], per_family=1, seed=0)

    async def go():
        out = []
        for task in tasks:
            async def step(messages, k, task=task):
                r = await runtime.complete(messages, session=task.task_id, step=k)
                return r.text, r.route.value
            out.append(await run_task(task, step))
        return out

    trajs = run(go())
    rows = runtime.ledger.rows("t")
    assert len(rows) == sum(len(t.routes) for t in trajs)
    assert {r["route"] for r in rows} == {"local", "cloud"}
    for r in rows:
        assert r["route"] == ("cloud" if r["step"] == 0 else "local")
        assert 0.0 <= r["p_local"] <= 1.0 and r["reason"] == "predictor"
        assert r["prompt_tokens"] > 0 and r["latency_s"] > 0 and r["cost_usd"] > 0
        if r["route"] == "cloud":
            assert r["cost_usd"] == r["cloud_cost_usd"]
        else:
            assert r["cost_usd"] < r["cloud_cost_usd"]  # energy of a small model vs per-token price
    totals = runtime.ledger.totals("t")
    assert 0 < totals["local_share"] < 1 and totals["saving_usd"] > 0


def test_local_only_never_reaches_the_cloud_and_cloud_only_skips_scoring(runtime):
    msgs = [{"role": "user", "content": "Confidential: summarize 'acct 991'."}]
    r = run(runtime.complete(msgs, session="c", step=0, override=Override.LOCAL_ONLY))
    assert r.route is Route.LOCAL and r.decision.reason == "local-only"
    r = run(runtime.complete(msgs, session="c", step=5, override=Override.CLOUD_ONLY))
    assert r.route is Route.CLOUD and r.decision.p_local is None


def test_step_index_counts_assistant_turns():
    msgs = [{"role": "system", "content": ""}, {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert step_index(msgs) == 1 and step_index(msgs[:2]) == 0


def test_hot_prefix_lowers_the_threshold_by_the_cached_share(runtime):
    """policy.hot_prefix_discount: a step whose prompt is mostly in the SLM's KV cache gets a
    lower kappa (finishing it locally costs little), in proportion to the cached share."""
    runtime.hot_prefix_discount = 0.5
    kappa = runtime.predictor.kappa(1)
    conv = [{"role": "system", "content": "You are a terse assistant number 4711. " * 12},
            {"role": "user", "content": "Say hi."}]
    sc = run(runtime.score(conv, 1))
    cold, pre_cold = sc.threshold, sc.prefill
    assert cold == pytest.approx(kappa - 0.5 * pre_cold.cached_tokens / pre_cold.prompt_tokens)
    conv += [{"role": "assistant", "content": "Hi."}, {"role": "user", "content": "Again."}]
    sc = run(runtime.score(conv, 1))
    hot, pre_hot = sc.threshold, sc.prefill
    share = pre_hot.cached_tokens / pre_hot.prompt_tokens
    assert share > 0.8 and hot == pytest.approx(kappa - 0.5 * share) and hot < cold
    result = run(runtime.complete(conv, session="hot", step=1, max_tokens=4))
    assert result.decision.threshold < kappa  # the discount reaches the routing decision
    runtime.hot_prefix_discount = 0.0
    assert run(runtime.score(conv, 1)).threshold == pytest.approx(kappa)


def test_a_cost_weighted_threshold_reaches_the_routing_decision(runtime):
    """With a cost weight, a step's threshold is weighed by its expected cloud cost: its prompt as
    the SLM counted it, at the configured prices."""
    from hera_core.routing.predictor import CostWeight

    runtime.predictor.kappa = kappa = Kappa(0.5, 0.0, 5, CostWeight(1.0, (200.0,), 50.0, 20.0, max_ratio=8.0))
    conv = [{"role": "user", "content": "Count the letters r in strawberry, then say the number."}]
    sc = run(runtime.score(conv, 0))
    n = sc.prefill.prompt_tokens  # the prefill's own count is what weighs the step
    expected = 1 - 0.5 * min((n + 4 * 200) / (50 + 4 * 20), 8.0)
    assert sc.threshold == pytest.approx(expected) and expected < kappa(0)  # a costly step: more often local
    result = run(runtime.complete(conv, session="cw", step=0, max_tokens=4))
    assert result.decision.threshold == pytest.approx(expected)


# --- draft, check, escalate ---------------------------------------------------------------------
ASK_PROGRAM = [{"role": "user", "content": "Write a short Python program that prints 6 * 7."}]


def all_uncertain(runtime, draft_stage=None):
    """Threshold 0.5 with a band of 1: every step is drafted and checked first."""
    runtime.predictor.kappa = Kappa(0.5, 0.0, 0)
    runtime.draft_band = 1.0
    runtime.predictor.draft = draft_stage


def test_an_escalated_step_is_one_cloud_row_that_also_pays_for_its_draft(runtime):
    from tests.factories import constant_draft_stage

    all_uncertain(runtime, constant_draft_stage(keep=False))
    r = run(runtime.complete(ASK_PROGRAM, session="esc", step=0, max_tokens=24))
    assert r.route is Route.CLOUD and r.decision.reason == "escalated" and r.draft is not None
    rows = runtime.ledger.rows("t")
    assert len(rows) == 1 and rows[0]["route"] == "cloud" and rows[0]["reason"] == "escalated"
    assert rows[0]["cost_usd"] > rows[0]["cloud_cost_usd"] > 0  # the draft's energy is added
    assert rows[0]["latency_s"] >= r.generation.latency_s


def test_a_kept_draft_is_the_answer_without_a_second_decode(runtime):
    from tests.factories import constant_draft_stage

    all_uncertain(runtime, constant_draft_stage(keep=True))
    before = runtime.local.stats["generated_tokens"]
    r = run(runtime.complete(ASK_PROGRAM, session="keep", step=0, max_tokens=24))
    assert r.route is Route.LOCAL and r.decision.reason == "draft-kept"
    assert runtime.local.stats["generated_tokens"] - before == r.generation.completion_tokens  # decoded once
    assert r.generation.extra["token_logprobs"] and len(r.generation.extra["token_logprobs"]) == r.generation.completion_tokens
    assert runtime.ledger.rows("t")[-1]["reason"] == "draft-kept"


def test_without_a_draft_stage_the_checks_decide(runtime):
    all_uncertain(runtime)
    for messages in (ASK_PROGRAM, [{"role": "user", "content": "Q? A) red B) blue\nReply with only the "
                                                                "letter of the correct option, as: ANSWER: <letter>"}]):
        r = run(runtime.complete(messages, session="rule", step=0, max_tokens=24))
        assert r.draft is not None
        assert (r.route is Route.LOCAL) == r.draft.passed
        assert r.decision.reason == ("draft-kept" if r.draft.passed else "escalated")


def test_streaming_an_escalated_step_sends_the_cloud_answer_once_decided(runtime):
    from tests.factories import constant_draft_stage

    all_uncertain(runtime, constant_draft_stage(keep=False))
    decisions, deltas = [], []

    async def on_decision(d):
        decisions.append(d)

    r = run(runtime.complete(ASK_PROGRAM, session="s", step=0, max_tokens=24, on_text=deltas.append,
                             on_decision=on_decision))
    assert [d.reason for d in decisions] == ["escalated"] and "".join(deltas) == r.text


def test_steps_whose_prefills_come_back_together_are_scored_in_one_call(runtime):
    """Concurrent steps queued behind a decode: their prefills are evaluated in one engine batch,
    then scored in one feature call and one predictor call; each step's P is what scoring its
    own feature row alone gives."""
    import asyncio

    convs = [[{"role": "user", "content": f"Question {i}: what is {i} + {i}?"}] for i in range(6)]

    async def together():
        decoding = asyncio.Event()
        busy = asyncio.create_task(runtime.local.generate([{"role": "user", "content": "Count to 30."}],
                                                          max_tokens=64, on_text=lambda _: decoding.set()))
        await decoding.wait()
        scores = await asyncio.gather(*[runtime.score(c, 0) for c in convs])
        await busy
        return scores

    before = runtime.score_stats
    scores = run(together())
    batches = runtime.score_stats["batches"] - before["batches"]
    rows = runtime.score_stats["rows"] - before["rows"]
    assert rows == 6 and batches < rows  # several steps per predictor call
    for sc in scores:
        assert sc.p_local == pytest.approx(float(runtime.predictor.predict(sc.features)[0]), abs=1e-6)


def test_samples_vote_on_a_drafted_step(runtime):
    """agreement_k: samples of a drafted step (sharing its prompt's KV) vote on the draft's
    answer; 2 are drawn first and the rest only if those disagree; a draft is kept only if
    enough of them agree; at most k samples."""
    from tests.factories import constant_draft_stage

    all_uncertain(runtime, constant_draft_stage(keep=True))
    runtime.agreement_k, runtime.agreement_min = 4, 0.0
    before = runtime.local.stats["seq_copies"]
    r = run(runtime.complete(ASK_PROGRAM, session="vote", step=0, max_tokens=24))
    vote = r.draft.agreement
    assert vote is not None and vote.samples in (2, 4) and 0.0 <= vote.share <= 1.0
    assert (vote.samples == 2) == (vote.share == 1.0)  # stopped early exactly when the first two agreed
    assert runtime.local.stats["seq_copies"] > before  # the samples copied the prompt's KV
    assert r.route is Route.LOCAL and r.decision.reason == "draft-kept"
    runtime.agreement_min = 1.01  # no vote can reach it: every drafted step escalates
    r = run(runtime.complete(ASK_PROGRAM, session="vote2", step=0, max_tokens=24))
    assert r.route is Route.CLOUD and r.decision.reason == "escalated" and r.draft.agreement is not None
    runtime.agreement_k = 0


def test_the_vote_stage_decides_first_steps_from_the_draft_and_its_samples(runtime):
    """A predictor with a vote stage: a task's first step is drafted whatever its P, kept only if
    its checks pass and enough samples agree (the first two alone when they both do), else
    escalated; later steps and policy.vote = "off" follow kappa without drafting."""
    from hera_core.routing.predictor import VoteStage

    runtime.predictor.kappa = Kappa(1.01, 0.0, 0)  # kappa alone would send every step to the cloud
    later = ASK_PROGRAM + [{"role": "assistant", "content": "```python\nprint(42)\n```"},
                           {"role": "user", "content": "It printed 42. Now reply: ANSWER: <number>"}]

    async def go():  # one event loop: the cloud client's session lives in it
        runtime.predictor.vote = VoteStage(steps=1, k=4, min_share=0.5)
        first = await runtime.complete(ASK_PROGRAM, session="v", step=0, max_tokens=24)
        second = await runtime.complete(later, session="v", step=1, max_tokens=8)
        runtime.vote = "off"
        off = await runtime.complete(ASK_PROGRAM, session="v2", step=0, max_tokens=24)
        return first, second, off

    try:
        r, second, off = run(go())
    finally:
        runtime.predictor.vote, runtime.vote = None, "auto"
    vote = r.draft.agreement
    # Kappa 1.01: a free-text draft is never kept on the prefill's say; a failed one gets no samples.
    keep = r.draft.passed and vote is not None and vote.share >= 0.5
    assert (r.route, r.decision.reason) == ((Route.LOCAL, "draft-kept") if keep else (Route.CLOUD, "escalated"))
    if vote is not None:
        assert vote.samples in (2, 4) and (vote.samples == 2) == (vote.share == 1.0)
    if not r.draft.passed:
        assert vote is None
    for res in (second, off):
        assert res.draft is None and (res.route, res.decision.reason) == (Route.CLOUD, "predictor")


def test_a_vote_stage_on_an_engine_that_cannot_sample_falls_back_to_the_prefill(runtime, monkeypatch):
    """No samples to be had (an engine without sampling, or fewer slots than k): the step is not
    failed and not kept on its checks alone; the prefill's decision stands, as for free text."""
    from hera_core.errors import CannotServeLocallyError
    from hera_core.routing.predictor import VoteStage

    async def cannot(*a, **k):
        raise CannotServeLocallyError("this engine cannot sample")

    monkeypatch.setattr(runtime.local, "generate_samples", cannot)
    runtime.predictor.kappa = Kappa(-1.0, 0.0, 0)  # the prefill says local
    runtime.predictor.vote = VoteStage(steps=1, k=4, min_share=1.0)
    try:
        r = run(runtime.complete(ASK_PROGRAM, session="nv", step=0, max_tokens=24))
    finally:
        runtime.predictor.vote = None
    assert r.draft is not None and r.draft.agreement is None
    assert (r.route, r.decision.reason) == ((Route.LOCAL, "draft-kept") if r.draft.passed else (Route.CLOUD, "escalated"))


def test_agreement_counts_the_draft_group_and_ties_go_to_the_draft():
    from hera_core.checks.drafts import agreement, vote_key

    assert vote_key("```python\nprint(6 * 7)\n```") == "out:42" == vote_key("Sure:\n```python\nprint(42)\n```")
    assert vote_key("ANSWER: B") == "ans:b" and vote_key("```python\nraise SystemExit(3)\n```") == "out:(failed)"
    v = agreement("out:42", ["out:42", "out:41", "out:41"])
    assert v.share == pytest.approx(1 / 3) and v.majority == 0 and v.majority_share == 0.5  # a tie: the draft
    v = agreement("out:40", ["out:41", "out:41", "out:42"])
    assert v.share == 0.0 and v.majority == 1 and v.majority_share == 0.5
    assert agreement("x", []).share == 1.0
