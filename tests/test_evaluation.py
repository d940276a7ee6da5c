"""Profiling, training and evaluation on real models (SmolLM2 as both, for plumbing), and the
offline replay that reproduces the report with no model running."""

import pytest

from hera_core.backends.caching import CachingEngine, CompletionCache
from hera_core.config import load_settings
from hera_core.backends.cloud import CloudEngine
from hera_core.offline.evaluation import METHOD_NAMES, Evaluator, evaluate, query_threshold
from hera_core.offline.report import estimated_curve, plot
from hera_core.offline.stats import bootstrap_ci
from hera_core.offline.profiling import done_task_ids, load_traces, profile
from hera_core.offline.workloads import make_tasks
from hera_core.routing.predictor import FEATURE_NAMES, VoteStage
from tests.conftest import TINY, run
from tests.factories import random_predictor


def voting_predictor():
    """A plumbing predictor whose vote stage decides each task's first step (2 samples)."""
    p = random_predictor()
    p.vote = VoteStage(steps=1, k=2, min_share=0.5)
    return p


class _Offline:
    is_local = False

    def __init__(self, name):
        self.name = name

    async def generate(self, *a, **k):
        raise AssertionError("offline replay must not call a model")

    async def prefill(self, *a, **k):
        raise AssertionError("offline replay must not call a model")

    async def close(self):
        return None


@pytest.fixture(scope="module")
def profiled(tiny_engine, cloud_url, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    cache = CompletionCache(tmp / "cache.sqlite")
    tasks = make_tasks(["basic_arithmetic", "letter_counting"], per_family=1, seed=0, split="test")

    async def go():
        async with CloudEngine(cloud_url, TINY) as cloud:
            slm, llm = CachingEngine(tiny_engine, cache), CachingEngine(cloud, cache)
            await profile(tasks[:1], slm, llm, tmp / "traces.jsonl", progress=False)
            await profile(tasks, slm, llm, tmp / "traces.jsonl", progress=False)  # resumes: only the rest
            ev = Evaluator(slm, llm, voting_predictor(), cache, load_settings(env={}).prices, TINY)
            return await evaluate(tasks, ev, sweep=(-1.0, 1.0))

    report = run(go())
    cache.close()
    return tmp, tasks, report


def test_profile_is_append_only_and_resumable(profiled):
    tmp, tasks, _ = profiled
    traces = load_traces(tmp / "traces.jsonl")
    assert [t["task_id"] for t in traces] == [t.task_id for t in tasks]  # each task once, in order
    assert done_task_ids(tmp / "traces.jsonl") == {t.task_id for t in tasks}
    for t in traces:
        assert t["steps"] and all(len(s["features"]) == len(FEATURE_NAMES) and s["label"] in (0, 1) for s in t["steps"])


def test_profile_records_the_drafts_checks_and_log_probabilities(profiled):
    from hera_core.checks.drafts import DRAFT_FEATURE_NAMES

    tmp, _, _ = profiled
    steps = [s for t in load_traces(tmp / "traces.jsonl") for s in t["steps"]]
    assert steps
    for s in steps:
        assert len(s["draft_features"]) == len(DRAFT_FEATURE_NAMES)
        # Recorded while decoding, one per token; here the SLM and the stand-in cloud are the same
        # model under one name, so a draft may come from the cloud's cache entry and be scored
        # teacher-forced, where re-tokenizing its text can merge a token or two.
        assert abs(len(s["slm_token_logprobs"]) - s["slm_completion_tokens"]) <= 2 and s["slm_completion_tokens"] > 0
        assert all(lp <= 0 for lp in s["slm_token_logprobs"])
        assert s["draft_features"][DRAFT_FEATURE_NAMES.index("logprob_min")] == pytest.approx(
            min(s["slm_token_logprobs"]), abs=1e-3)


def test_hera_drafts_backfills_old_traces_and_resumes(profiled, tiny_engine, tmp_path):
    """Traces profiled before drafts were recorded get the checks and teacher-forced log-probs,
    the same features the profiler records; a rerun adds nothing."""
    import json

    from hera_core.offline.drafts import draft_features_file

    tmp, tasks, _ = profiled
    fresh = load_traces(tmp / "traces.jsonl")
    old = tmp_path / "old.jsonl"
    with old.open("w") as f:
        for t in fresh:
            stripped = json.loads(json.dumps(t))
            for s in stripped["steps"]:
                for key in ("draft_features", "draft_feature_names", "slm_token_logprobs"):
                    s.pop(key)
            f.write(json.dumps(stripped) + "\n")
    out = tmp_path / "drafts.jsonl"
    by_id = {t.task_id: t for t in tasks}
    assert run(draft_features_file(old, out, by_id, tiny_engine)) == len(fresh)
    assert run(draft_features_file(old, out, by_id, tiny_engine)) == 0
    for a, b in zip(load_traces(out), fresh):
        for sa, sb in zip(a["steps"], b["steps"]):
            assert len(sa["draft_features"]) == len(sb["draft_features"])
            assert abs(len(sa["slm_token_logprobs"]) - sa["slm_completion_tokens"]) <= 2
            assert sa["draft_features"][:10] == sb["draft_features"][:10]  # the checks agree exactly


def test_report_has_every_method_with_consistent_numbers(profiled):
    _, tasks, report = profiled
    assert set(report["methods"]) == set(METHOD_NAMES)
    m = report["methods"]
    assert m["all_slm"]["local_share"] == 1.0 and m["all_llm"]["local_share"] == 0.0
    assert m["all_llm"]["cost_ratio"] == 1.0 and m["all_slm"]["cost_ratio"] == 0.0
    for name in METHOD_NAMES:
        lo, hi = m[name]["accuracy_ci95"]
        assert lo <= m[name]["accuracy"] <= hi and m[name]["tasks"] == len(tasks)
    assert set(report["families"]) == {"basic_arithmetic", "letter_counting"}


def test_query_cascade_keeps_the_slm_run_that_passes_its_checks_and_reruns_the_rest(profiled):
    from hera_core.checks.drafts import check_draft
    from hera_core.offline.evaluation import TaskResult, query_cascade

    _, _, report = profiled
    per = {name: {t["task_id"]: t for t in report["per_task"][name]} for name in ("all_slm", "all_llm", "query_cascade")}
    for tid, c in per["query_cascade"].items():
        slm, llm = per["all_slm"][tid], per["all_llm"][tid]
        kept = c["routes"] == slm["routes"]
        assert kept or c["routes"] == ["local"] * len(slm["routes"]) + llm["routes"]
        assert c["correct"] == (slm if kept else llm)["correct"]
    # The rule itself, on a run whose final answer fails a check (a letter was asked for):
    msgs = [{"role": "user", "content": "Reply with only the letter, as: ANSWER: <letter>"},
            {"role": "assistant", "content": "I am not sure"}]
    assert not check_draft(msgs[:1], msgs[1]["content"]).passed
    slm, llm = TaskResult("t", "f", 1.0, [], msgs), TaskResult("t", "f", 0.0, [], msgs)
    assert query_cascade([slm], [llm])[0].correct == 0.0


def test_hera_with_a_draft_stage_drafts_checks_and_escalates(profiled, tiny_engine, cloud_url):
    """A stage that always escalates, drafting every step: HERA then answers exactly as All-LLM,
    every step escalated, and each escalated step's latency includes its draft."""
    from hera_core.offline.evaluation import Hera, summarize
    from hera_core.routing.predictor import Kappa
    from tests.factories import constant_draft_stage

    tmp, tasks, _ = profiled
    predictor = random_predictor(kappa=Kappa(0.5, 0.0, 0))
    predictor.draft = constant_draft_stage(keep=False)
    predictor.draft.band = 1.0
    cache = CompletionCache(tmp / "cache.sqlite")

    async def go():
        async with CloudEngine(cloud_url, TINY) as cloud:
            ev = Evaluator(CachingEngine(tiny_engine, cache), CachingEngine(cloud, cache), predictor, cache,
                           load_settings(env={}).prices, TINY)
            from hera_core.offline.evaluation import AllLLM

            return await ev.run(Hera(), tasks), await ev.run(AllLLM(), tasks)

    try:
        hera, llm = run(go())
    finally:
        cache.close()
    assert [r.correct for r in hera] == [r.correct for r in llm]
    steps = [s for r in hera for s in r.steps]
    assert steps and all(s.route == "cloud" and s.escalated for s in steps)
    m = summarize(hera, sum(s.cloud_cost_usd for r in llm for s in r.steps))
    assert m["escalated_share"] == 1.0 and m["local_share"] == 0.0 and m["cost_ratio"] == pytest.approx(1.0)
    for h, l in zip(hera, llm):
        assert all(hs.latency_s > ls.latency_s for hs, ls in zip(h.steps, l.steps))


def test_oracle_is_run_and_never_loses_a_task_the_llm_solves(profiled):
    # Each oracle step keeps the better of two play-outs that both finish on the LLM, so by
    # induction it ends at least as correct as All-LLM on every task.
    _, tasks, report = profiled
    oracle = {r["task_id"]: r for r in report["per_task"]["oracle"]}
    for r in report["per_task"]["all_llm"]:
        assert oracle[r["task_id"]]["correct"] >= r["correct"]
        assert set(oracle[r["task_id"]]["routes"]) <= {"local", "cloud"}
    assert not report["methods"]["oracle"].get("estimated")


def test_offline_replay_reproduces_the_report_without_models(profiled):
    tmp, tasks, report = profiled
    cache = CompletionCache(tmp / "cache.sqlite", read_only=True)
    ev = Evaluator(CachingEngine(_Offline(TINY), cache), CachingEngine(_Offline(TINY), cache), voting_predictor(),
                   cache, load_settings(env={}).prices, TINY)
    again = run(evaluate(tasks, ev, sweep=(-1.0, 1.0)))
    cache.close()
    for name in METHOD_NAMES:
        for key in ("accuracy", "local_share", "cost_ratio"):
            assert again["methods"][name][key] == report["methods"][name][key]


def test_hera_votes_on_each_first_step_and_books_the_samples_time(profiled):
    """With a vote stage, every task's first step is drafted: kept exactly when the draft passes
    its checks and the staged vote reaches min_share, else escalated; the samples' recorded time
    is part of the step's latency. Replayed from the cache the fixture's live run filled."""
    from hera_core.checks.drafts import check_draft, staged_agreement, votable, vote_key
    from hera_core.offline.evaluation import MAX_TOKENS, AllSLM, Hera
    from hera_core.offline.harness import first_messages

    tmp, tasks, _ = profiled
    cache = CompletionCache(tmp / "cache.sqlite", read_only=True)
    ev = Evaluator(CachingEngine(_Offline(TINY), cache), CachingEngine(_Offline(TINY), cache), voting_predictor(),
                   cache, load_settings(env={}).prices, TINY)
    try:
        hera, slm = run(ev.run(Hera(unfamiliar="trust"), tasks)), run(ev.run(AllSLM(), tasks))
        for task, h, s in zip(tasks, hera, slm):
            msgs = first_messages(task)
            draft = cache.get(TINY, {"messages": msgs, "max_tokens": MAX_TOKENS, "stop": []})
            votes = cache.get_features(f"{TINY}:votes2", msgs)
            passed, key = check_draft(msgs, draft.text).passed, vote_key(draft.text)
            # a failed draft escalates without samples; free text is kept on the prefill's say
            assert (passed and votable(key)) == (votes is not None)
            if votes is None:
                keep = passed and run(ev.p_local(msgs, 0, task)) >= ev.predictor.kappa(0)
            else:
                keep = staged_agreement(key, votes["keys"]).share >= 0.5
            first = h.steps[0]
            assert (first.route, first.escalated) == (("local", False) if keep else ("cloud", True))
            if keep:  # the samples' time is booked where samples were drawn
                assert first.latency_s == pytest.approx(s.steps[0].latency_s + (votes["samples_s"] if votes else 0.0))
    finally:
        cache.close()


def test_hera_weighs_a_steps_threshold_by_its_expected_cloud_cost_as_the_runtime_does(profiled):
    """With a cost weight in the predictor, the evaluated HERA routes a step by kappa weighed with
    the step's prompt tokens (from its feature row) at the configured prices."""
    from hera_core.offline.evaluation import Hera
    from hera_core.offline.harness import first_messages
    from hera_core.routing.predictor import CostWeight, Kappa

    tmp, tasks, _ = profiled
    cache = CompletionCache(tmp / "cache.sqlite", read_only=True)
    predictor = random_predictor()
    prices = load_settings(env={}).prices
    ev = Evaluator(CachingEngine(_Offline(TINY), cache), CachingEngine(_Offline(TINY), cache), predictor, cache,
                   prices, TINY)
    try:
        for task in tasks:
            msgs = first_messages(task)
            row = run(ev.feature_row(msgs, 0, task))
            tokens = row[0, FEATURE_NAMES.index("prompt_tokens")]
            p = float(predictor.predict(row)[0])
            # a weight that puts this step's threshold just above, then just below, its P
            for target in (min(p + 0.01, 0.999), max(p - 0.01, 0.001)):
                ratio = (1 - target) / (1 - predictor.kappa(0))
                predictor.kappa = Kappa(predictor.kappa.base, predictor.kappa.per_step, predictor.kappa.max_steps,
                                        CostWeight(1.0, (0.0,), float(tokens) / ratio, 0.0, max_ratio=100.0))
                assert ev.threshold(row, 0) == pytest.approx(target)
                route = run(Hera(unfamiliar="trust").route(task, 0, msgs, ev))
                assert route == ("local" if p >= target else "cloud")
    finally:
        cache.close()


def test_staged_agreement_stops_early_only_when_the_first_samples_agree():
    from hera_core.checks.drafts import staged_agreement

    v = staged_agreement("out:1", ["out:1", "out:1", "out:2", "out:2"])
    assert (v.share, v.samples) == (1.0, 2)  # the runtime would not have drawn the last two
    v = staged_agreement("out:1", ["out:1", "out:2", "out:2", "out:2"])
    assert (v.share, v.samples) == (0.25, 4) and v.majority == 2


def test_offline_miss_is_an_error(profiled, tmp_path):
    tmp, tasks, _ = profiled
    cache = CompletionCache(tmp_path / "empty.sqlite", read_only=True)
    ev = Evaluator(CachingEngine(_Offline(TINY), cache), CachingEngine(_Offline(TINY), cache), random_predictor(),
                   cache, load_settings(env={}).prices, TINY)
    with pytest.raises(LookupError, match="offline"):
        run(evaluate(tasks, ev))
    cache.close()


def test_plot_and_estimated_curve(profiled, tmp_path):
    tmp, _, report = profiled
    curve = estimated_curve(load_traces(tmp / "traces.jsonl"), random_predictor())
    assert curve[0]["local_share"] >= curve[-1]["local_share"]  # higher threshold, fewer local steps
    path = tmp_path / "eval.png"
    assert report["sweep"][0]["threshold_offset"] == 0.0  # HERA itself, then the offsets
    # Offsets past both ends move every step but the first (the vote stage decides those, whatever kappa)
    low, high = report["sweep"][1:]
    first_steps = len(report["per_task"]["hera"]) / sum(len(t["routes"]) for t in report["per_task"]["all_llm"])
    assert low["local_share"] >= 1.0 - first_steps - 1e-9 and high["local_share"] <= first_steps + 1e-9
    assert low["local_share"] >= high["local_share"]
    # the router is run at each point's share: none of its tasks local at share 0
    assert high["local_share"] > 0 or high["query_router"]["local_share"] == 0.0
    plot(report, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_query_threshold_matches_the_share_of_steps():
    scores = {"a": 0.9, "b": 0.7, "c": 0.5, "d": 0.1}
    counts = {"a": 2, "b": 2, "c": 3, "d": 3}
    t = query_threshold(scores, counts, 0.4)
    assert sum(counts[k] for k, p in scores.items() if p >= t) / 10 == 0.4
    assert query_threshold(scores, counts, 1.0) <= 0.1


def test_bootstrap_interval_covers_the_mean():
    lo, hi = bootstrap_ci([0, 1] * 50)
    assert lo < 0.5 < hi and hi - lo < 0.25


def test_query_threshold_by_cost_keeps_the_cloud_tasks_within_the_budget():
    from hera_core.offline.evaluation import query_threshold_cost

    scores = {"a": 0.9, "b": 0.7, "c": 0.5, "d": 0.1}
    costs = {"a": 4.0, "b": 1.0, "c": 2.0, "d": 3.0}
    t = query_threshold_cost(scores, costs, 5.0)  # a and b local: c + d = 5 stay in the cloud
    assert {k for k, p in scores.items() if p < t} == {"c", "d"}
    assert query_threshold_cost(scores, costs, 10.0) > 0.9  # the budget holds everything: all cloud
    assert query_threshold_cost(scores, costs, 0.0) <= 0.1  # nothing may go to the cloud: all local


def test_paired_bootstrap_cancels_what_both_methods_share():
    from hera_core.offline.stats import paired_bootstrap

    a = [1.0] * 60 + [0.0] * 40
    b = [1.0] * 55 + [0.0] * 45  # the same tasks, five fewer solved
    d = paired_bootstrap(a, b)
    assert d["diff"] == pytest.approx(0.05) and 0 < d["ci95"][0] <= 0.05 <= d["ci95"][1] <= 0.11
    assert paired_bootstrap(b, a)["ci95"][1] < 0  # the other way round: below zero
    with pytest.raises(ValueError):
        paired_bootstrap(a, b[:-1])


def test_report_compares_hera_with_each_method_on_the_same_tasks(profiled):
    _, _, report = profiled
    assert set(report["hera_minus"]) == set(METHOD_NAMES) - {"hera"}
    for name, d in report["hera_minus"].items():
        assert d["diff"] == pytest.approx(report["methods"]["hera"]["accuracy"] - report["methods"][name]["accuracy"])
    router = report["methods"]["query_router_cost"]
    assert router["cloud_cost_usd"] <= report["methods"]["hera"]["cloud_cost_usd"] + 1e-12


def test_hera_takes_each_workloads_operating_point_as_the_runtime_does(profiled):
    """A predictor shared by workloads: the evaluated HERA routes each task's steps at the threshold
    of the workload its task is most like (Predictor.threshold_at, which the runtime reads)."""
    from hera_core.offline.evaluation import Hera
    from hera_core.offline.harness import first_messages
    from hera_core.routing.familiarity import fit_familiarity, opening_text
    from hera_core.routing.predictor import Kappa, Workload

    tmp, tasks, _ = profiled
    families = sorted({t.family for t in tasks})
    cache = CompletionCache(tmp / "cache.sqlite", read_only=True)
    predictor = random_predictor(kappa=Kappa(0.5, 0.0, 0))
    predictor.familiarity = fit_familiarity(
        [(t.family, opening_text(first_messages(t))) for t in make_tasks(families, per_family=10, split="train")], [])
    local, cloud = Kappa(-0.01, 0.0, 0), Kappa(1.01, 0.0, 0)
    predictor.workloads = (Workload("a", (families[0],), local), Workload("b", (families[1],), cloud))
    ev = Evaluator(CachingEngine(_Offline(TINY), cache), CachingEngine(_Offline(TINY), cache), predictor, cache,
                   load_settings(env={}).prices, TINY)
    try:
        for task in tasks:
            msgs = first_messages(task)
            row = run(ev.feature_row(msgs, 0, task))
            kappa = local if task.family == families[0] else cloud
            assert ev.threshold(row, 0, msgs) == kappa.at(0, 0)
            assert run(Hera().route(task, 0, msgs, ev)) == ("local" if task.family == families[0] else "cloud")
    finally:
        cache.close()
