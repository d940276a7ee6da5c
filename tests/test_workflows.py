"""The multi-stage workflow workload (#33): generator, splits, stage scorers, the harness."""

import json
from collections import Counter

import pytest

from hera_core.checks.sandbox import run_python
from hera_core.offline import workflows as wf
from hera_core.offline.harness import generate_step, run_direct, run_task
from hera_core.offline.workloads import WORKFLOW_FAMILIES, make_tasks, split_of
from tests.conftest import run

FAMILY = WORKFLOW_FAMILIES[0]


def test_generator_is_deterministic_and_seeded():
    a, b = wf.entries(FAMILY, seed=0), wf.entries(FAMILY, seed=0)
    assert a == b and len(a) >= 300
    assert len({e["task_id"] for e in a}) == len(a)
    assert [e["message"] for e in wf.entries(FAMILY, seed=1)[:20]] != [e["message"] for e in a[:20]]
    assert wf.make_entry(FAMILY, 0, 7) == a[7]  # a task depends on its id only


def test_splits_are_60_20_20_by_id_and_disjoint():
    tasks = make_tasks([FAMILY], per_family=1000, seed=0)
    assert len(tasks) == wf.POOL and all(t.kind == "workflow" for t in tasks)
    counts = Counter(split_of(t.task_id) for t in tasks)
    assert 0.5 < counts["train"] / len(tasks) < 0.7 and 0.12 < counts["test"] / len(tasks) < 0.28
    test = make_tasks([FAMILY], per_family=1000, seed=0, split="test")
    train = make_tasks([FAMILY], per_family=1000, seed=0, split="train")
    assert len(test) == counts["test"] and not {t.task_id for t in test} & {t.task_id for t in train}


def test_the_answers_are_consistent_with_the_entry():
    for e in wf.entries(FAMILY)[:100]:
        lines = sum(e["prices"][n] * q * (0.9 if q >= 10 else 1) for n, q in e["items"].items())
        assert abs(e["total"] - round(lines * 1.08, 2)) < 0.006
        assert all(n in e["prompts"][0] for n in e["items"])
        matches = {"MGR": e["total"] > e["threshold"], "FREE": len(e["items"]) >= 4,
                   "FRT": any(wf.CATEGORY[n] == "furniture" for n in e["items"])}
        first = next((c for c in ("MGR", "FRT", "FREE") if matches[c]), "STD")
        assert e["code"] == first and f'"MGR" if TOTAL is over {e["threshold"]};' in e["prompts"][2]
    for e in wf.entries(FAMILY)[:5]:  # what the stages' programs are given; the reference programs
        for k, program in enumerate(wf.REFERENCE_PROGRAMS):
            answer, _ = wf.stage_answer(e, k + 1, "```python\n" + program.format(threshold=e["threshold"]) + "```")
            assert wf.score_stage(e, k + 1, answer) == 1.0
        ok, out = run_python(wf.prelude(e, stage=2) + "print(TOTAL, len(ORDER), any(i in FURNITURE for i in ORDER))")
        furniture = any(wf.CATEGORY[n] == "furniture" for n in e["items"])
        assert ok and out.split() == [str(e["total"]), str(len(e["items"])), str(furniture)]
        ok, out = run_python(wf.prelude(e, stage=1) + "print(sorted(PRICES) == sorted(%r), ORDER == %r)"
                             % (list(e["prices"]), e["items"]))
        assert ok and out.split() == ["True", "True"]
        # the compute stage is not given its own answer: a program printing TOTAL fails there
        assert wf.stage_answer(e, 1, "```python\nprint(TOTAL)\n```")[0] is None
        assert wf.prelude(e, stage=0) == wf.prelude(e, stage=3) == ""
        assert (e["distractor"] or e["words"]) or all(f"{q} {n}" in e["message"] for n, q in e["items"].items())


def test_the_generator_mixes_easy_and_hard_stages():
    es = wf.entries(FAMILY)
    codes = Counter(e["code"] for e in es)
    assert set(codes) == {"MGR", "FRT", "FREE", "STD"} and max(codes.values()) < 0.5 * len(es)
    plain = sum(not e["distractor"] and not e["words"] for e in es)
    assert 0.25 * len(es) < plain < 0.6 * len(es)  # digits only, nothing to leave out


def test_every_stage_accepts_its_reference_and_rejects_perturbed_answers():
    letters = Counter()
    for e in wf.entries(FAMILY)[:100]:
        for k, stage in enumerate(wf.STAGES):
            assert wf.score_stage(e, k, e["answers"][k]) == 1.0, (stage, e["task_id"])
            assert wf.score_stage(e, k, None) == 0.0
        items = dict(e["items"])
        name = next(iter(items))
        assert wf.score_stage(e, 0, json.dumps({**items, name: items[name] + 1})) == 0.0
        assert wf.score_stage(e, 0, json.dumps({k: v for k, v in items.items() if k != name})) == 0.0
        assert wf.score_stage(e, 0, json.dumps({k.upper(): v for k, v in items.items()})) == 1.0
        assert wf.score_stage(e, 1, f"{e['total'] + 0.01:.2f}") == 0.0
        assert wf.score_stage(e, 1, f"${e['total']:,.2f}") == 1.0
        assert wf.score_stage(e, 2, e["code"]) == 1.0
        assert wf.score_stage(e, 2, next(c for c in ("MGR", "FRT", "FREE", "STD") if c != e["code"])) == 0.0
        assert wf.score_stage(e, 0, json.dumps({k.replace(" ", "") + "s": v for k, v in items.items()})) == 1.0
        other = "STD" if e["code"] != "STD" else "MGR"
        assert wf.score_stage(e, 3, wf.confirmation(e["total"], other)) == 0.0
        assert wf.score_stage(e, 3, wf.confirmation(e["total"] + 1, e["code"])) == 0.0
        assert wf.score_stage(e, 3, wf.confirmation(e["total"] + 0.01, e["code"])) == 0.0
        # the total as the program printed it: round(x, 2) drops a trailing zero
        assert wf.score_stage(e, 3, f"Your total is ${e['total']!r} [{e['code']}].") == 1.0
        assert wf.score_stage(e, 3, f"Your total is ${e['total']:,.2f} [{e['code']}].") == 1.0
        letters[e["code"]] += 1
    assert len(letters) == 4  # every code is a right answer somewhere


def test_stage_answers_are_read_from_replies():
    e = wf.entries(FAMILY)[0]
    assert wf.stage_answer(e, 0, f"Sure: {json.dumps(e['items'])}")[0] == json.dumps(e["items"])
    answer, feedback = wf.stage_answer(e, 1, f"```python\nprint(round({e['total']}, 2))\n```")
    assert wf.score_stage(e, 1, answer) == 1.0 and feedback.startswith("The program printed:")
    answer, _ = wf.stage_answer(e, 1, "```python\nprint(round(sum(PRICES[n] * q * (0.9 if q >= 10 else 1) "
                                "for n, q in " + json.dumps(e["items"]) + ".items()) * 1.08, 2))\n```")
    assert wf.score_stage(e, 1, answer) == 1.0  # the price look-up is defined for the program
    answer, feedback = wf.stage_answer(e, 1, "```python\nraise ValueError('no')\n```")
    assert answer is None and feedback.startswith("The program failed:")
    code = e["code"]
    assert wf.stage_answer(e, 2, f"ANSWER: {code}")[0] == code
    assert wf.stage_answer(e, 2, f"The code is {code}.")[0] == code
    assert wf.stage_answer(e, 2, "Not MGR but FRT.")[0] is None  # two codes, no ANSWER line
    rule = ("```python\nprint('MGR' if TOTAL > %d else 'FRT' if any(i in FURNITURE for i in ORDER) "
            "else 'FREE' if len(ORDER) >= 4 else 'STD')\n```" % e["threshold"])
    answer, feedback = wf.stage_answer(e, 2, rule)
    assert answer == code and feedback == f"The program printed:\n{code}"
    # a chained run's programs get its own upstream answers (names mapped to the catalogue's)
    program = "```python\nprint(sum(PRICES[n] * q for n, q in ORDER.items()))\n```"
    name = next(iter(e["items"]))
    stages = [{"answer": json.dumps({name.upper().replace(" ", "_") + "s": 1})}, {"answer": "$1,000,000.00"}]
    up = wf.upstream_of(e, stages)
    assert up == {"order": {name: 1}, "total": 1e6}
    assert wf.stage_answer(e, 1, program, up)[0] == str(e["prices"][name])
    assert wf.stage_answer(e, 2, rule, up)[0] == "MGR"  # a wrong total upstream, a wrong code here
    assert wf.upstream_of(e, [{"answer": "not json"}]) == {"order": {}}
    assert wf.upstream_of(e, [{"answer": "[1]"}, {"answer": None}]) == {"order": {}, "total": None}


def test_true_prefix_holds_the_reference_upstream_outputs():
    e = wf.entries(FAMILY)[3]
    assert wf.true_prefix(e, 0) == wf.first_messages(e)
    msgs = wf.true_prefix(e, 3)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant", "user", "assistant", "user"]
    assert msgs[5]["content"].startswith(f"The program printed:\n{e['total']!r}\n")  # as the program prints it
    assert msgs[-1]["content"] == f"The program printed:\n{e['code']}\n\n{e['prompts'][3]}"


def test_harness_runs_the_stages_with_a_scripted_model():
    task = make_tasks([FAMILY], per_family=1, seed=0)[0]
    e, seen = task.entry, []

    async def model(messages, step):
        seen.append(messages[-1]["content"])
        replies = [json.dumps(e["items"]), f"```python\nprint({e['total']})\n```", f"ANSWER: {e['code']}",
                   wf.confirmation(e["total"], e["code"])]
        return replies[step], "local" if step % 2 else "cloud"

    traj = run(run_task(task, model))
    assert traj.routes == ["cloud", "local", "cloud", "local"] and traj.correct == 1.0
    assert [s["correct"] for s in traj.stages] == [1.0] * 4
    assert seen[2].startswith("The program printed:")  # the tool output fed the next stage

    async def wrong_total(messages, step):
        replies = [json.dumps(e["items"]), "```python\nprint(1.5)\n```", f"ANSWER: {e['code']}",
                   wf.confirmation(1.5, e["code"])]
        return replies[step], "cloud"

    traj = run(run_task(task, wrong_total))
    assert [s["correct"] for s in traj.stages] == [1.0, 0.0, 1.0, 0.0] and traj.correct == 0.0
    formula = ("```python\nprint(round(sum(PRICES[n] * q * (0.9 if q >= 10 else 1) for n, q in ORDER.items())"
               " * 1.08, 2))\n```")
    for extracted, right in ((e["items"], 1.0), ({**e["items"], next(iter(e["items"])): 99}, 0.0)):
        async def uses_order(messages, step, extracted=extracted):
            return [json.dumps(extracted), formula, "ANSWER: STD", "ok"][step], "cloud"
        traj = run(run_task(task, uses_order))  # the program's ORDER is what stage 1 answered
        assert traj.stages[1]["correct"] == right
    assert len(run(run_direct(task, model)).routes) == 4  # no one-call baseline: the workflow itself


@pytest.mark.slow
def test_harness_runs_a_workflow_end_to_end_on_a_real_model(tiny_engine):
    """Plumbing with SmolLM2-135M: four steps, four scored stages (it need not be right)."""
    task = make_tasks([FAMILY], per_family=1, seed=0)[0]

    async def step(messages, k):
        return await generate_step(tiny_engine, task, messages, 48), "local"

    traj = run(run_task(task, step))
    assert len(traj.routes) == 4 and [s["stage"] for s in traj.stages] == list(wf.STAGES)
    assert traj.correct in (0.0, 1.0) and traj.messages[-1]["role"] == "assistant"
    row = run(wf.profile_stages(task.entry, {"tiny": tiny_engine}, max_tokens=24))
    assert [s["stage"] for s in row["stages"]] == list(wf.STAGES)
    assert all(s["tiny"]["correct"] in (0.0, 1.0) for s in row["stages"])


@pytest.mark.slow
def test_stage_labels_make_a_trace_hera_train_reads(tiny_engine, tmp_path, monkeypatch):
    """`hera profile --labels stage`: a trace per task, one step per stage, each with the SLM's
    prefill features on the stage's true prefix and the label "the SLM is no worse than the LLM"."""
    import hera_core.offline.profiling as profiling
    from hera_core.offline.profiling import load_traces, profile
    from hera_core.routing.predictor import FEATURE_NAMES

    monkeypatch.setattr(profiling, "MAX_TOKENS", 24)  # plumbing: SmolLM2 on both sides
    tasks = make_tasks([FAMILY], per_family=2, seed=0)
    out = run(profile(tasks, tiny_engine, tiny_engine, tmp_path / "t.jsonl", progress=False, labels="stage"))
    traces = load_traces(out)
    assert [t["task_id"] for t in traces] == [t.task_id for t in tasks]
    for t in traces:
        assert [s["stage"] for s in t["steps"]] == list(wf.STAGES) and t["labels"] == "stage"
        for s in t["steps"]:
            assert len(s["features"]) == len(FEATURE_NAMES) and s["features"][FEATURE_NAMES.index("step_index")] == s["step"]
            assert s["label"] == int(s["slm_stage_correct"] >= s["llm_stage_correct"])
        assert t["llm_correct"] == float(all(s["llm_stage_correct"] for s in t["steps"]))
    assert run(profile(tasks, tiny_engine, tiny_engine, out, progress=False, labels="stage")) == out  # resumed: nothing new
    assert len(load_traces(out)) == 2
    with pytest.raises(ValueError, match="workflow"):
        run(profiling.profile_stages_task(make_tasks(["gsm_symbolic"], per_family=1)[0], tiny_engine, tiny_engine))


@pytest.mark.slow
def test_hera_eval_runs_every_method_on_a_workflow(tiny_engine, cloud_url, tmp_path):
    """`hera eval` on workflow tasks (SmolLM2 on both sides, plumbing): every method runs the four
    stages, and the report has each method's local share per stage."""
    from hera_core.backends.caching import CachingEngine, CompletionCache
    from hera_core.backends.cloud import CloudEngine
    from hera_core.config import load_settings
    from hera_core.offline.evaluation import Evaluator, evaluate
    from tests.conftest import TINY
    from tests.factories import random_predictor

    tasks = make_tasks([FAMILY], per_family=1, seed=0, split="test")
    cache = CompletionCache(tmp_path / "cache.sqlite")

    async def go():
        async with CloudEngine(cloud_url, TINY) as cloud:
            ev = Evaluator(CachingEngine(tiny_engine, cache), CachingEngine(cloud, cache), random_predictor(), cache,
                           load_settings(env={}).prices, TINY)
            return await evaluate(tasks, ev)

    report = run(go())
    cache.close()
    assert report["per_task"]["all_llm"] and all(len(t["routes"]) == 4 for m in report["per_task"].values()
                                                  for t in m)
    assert report["stages"]["all_slm"] == {s: 1.0 for s in wf.STAGES}
    assert report["stages"]["all_llm"] == {s: 0.0 for s in wf.STAGES}
    hera = report["per_task"]["hera"]
    for k, stage in enumerate(wf.STAGES):
        assert report["stages"]["hera"][stage] == sum(t["routes"][k] == "local" for t in hera) / len(hera)


def test_a_drafts_program_is_checked_with_the_stage_prelude_of_its_own_run():
    """A workflow draft's program uses the names its prompt promises: its check runs it after the
    prelude rebuilt from the run's own upstream answers (program_prelude), so a right program passes."""
    from hera_core.checks.drafts import check_draft
    from hera_core.offline.harness import program_prelude

    task = make_tasks([FAMILY], per_family=1, seed=0)[0]
    e = task.entry
    own = {**e["items"], next(iter(e["items"])): 1}  # this run extracted one quantity wrong
    msgs = wf.first_messages(e) + [{"role": "assistant", "content": json.dumps(own)},
                                   {"role": "user", "content": e["prompts"][1]}]
    compute = "```python\n" + wf.REFERENCE_PROGRAMS[0] + "```"
    assert program_prelude(task, msgs) == wf.prelude(e, {"order": own}, 1)
    assert check_draft(msgs, compute, prelude=program_prelude(task, msgs)).passed
    assert not check_draft(msgs, compute).passed  # without it, PRICES is undefined
    msgs += [{"role": "assistant", "content": compute},
             {"role": "user", "content": "The program printed:\n123.4\n\n" + e["prompts"][2]}]
    assert program_prelude(task, msgs) == wf.prelude(e, {"order": own, "total": 123.4}, 2)
    assert program_prelude(task, wf.true_prefix(e, 3)) == ""


def test_the_committed_workflow_evaluation_replays_without_models(tmp_path):
    """bench/eval/workflows/report.json is reproduced from the committed completions with no model
    running: HERA (the committed predictor, its draft stage replayed with each stage's prelude), All-LLM
    and All-SLM take the same routes and get the same tasks right on the first 8 test tasks."""
    import lzma
    import shutil
    from pathlib import Path

    from hera_core.backends.caching import CachingEngine, CompletionCache
    from hera_core.cli_offline import _Offline
    from hera_core.config import PriceSettings
    from hera_core.offline.evaluation import AllLLM, AllSLM, Evaluator, Hera
    from hera_core.routing.predictor import Predictor

    root = Path(__file__).resolve().parents[1] / "bench" / "eval" / "workflows"
    report = json.loads((root / "report.json").read_text())
    with lzma.open(root / "completions.sqlite.xz") as src, open(tmp_path / "c.sqlite", "wb") as dst:
        shutil.copyfileobj(src, dst)
    tasks = make_tasks(["workflow_quote"], per_family=8, split="test")
    cache = CompletionCache(tmp_path / "c.sqlite", read_only=True)
    slm_name = "qwen2.5-coder-0.5b"
    ev = Evaluator(CachingEngine(_Offline(slm_name), cache), CachingEngine(_Offline("qwen2.5-coder-1.5b"), cache),
                   Predictor.load(root / "predictor.json"), cache, PriceSettings(), slm_name)
    try:
        for method in (AllLLM(), AllSLM(), Hera()):
            got = [{"task_id": r.task_id, "correct": r.correct, "routes": [s.route for s in r.steps]}
                   for r in run(ev.run(method, tasks))]
            assert got == report["per_task"][method.name][:8], method.name
    finally:
        cache.close()
