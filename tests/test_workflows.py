"""The multi-stage workflow workload (#33): generator, splits, stage scorers, the harness."""

import json
from collections import Counter

import pytest

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
        first = next((c for c in e["rule_order"] if matches[c]), "STD")
        assert e["code"] == first and f"{e['letter']}. " in e["prompts"][2]
        assert f"(code {e['code']})" in e["prompts"][2].split(f"{e['letter']}. ")[1].splitlines()[0]


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
        assert wf.score_stage(e, 2, "ABCD".replace(e["letter"], "")[0]) == 0.0
        assert wf.score_stage(e, 2, e["code"]) == 1.0
        assert wf.score_stage(e, 2, next(c for c in ("MGR", "FRT", "FREE", "STD") if c != e["code"])) == 0.0
        assert wf.score_stage(e, 0, json.dumps({k.replace(" ", "") + "s": v for k, v in items.items()})) == 1.0
        other = "STD" if e["code"] != "STD" else "MGR"
        assert wf.score_stage(e, 3, wf.confirmation(e["total"], other)) == 0.0
        assert wf.score_stage(e, 3, wf.confirmation(e["total"] + 1, e["code"])) == 0.0
        letters[e["letter"]] += 1
    assert len(letters) == 4  # every letter is a right answer somewhere


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
    assert wf.stage_answer(e, 2, f"ANSWER: {e['letter']}")[0] == e["letter"]


def test_true_prefix_holds_the_reference_upstream_outputs():
    e = wf.entries(FAMILY)[3]
    assert wf.true_prefix(e, 0) == wf.first_messages(e)
    msgs = wf.true_prefix(e, 3)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant", "user", "assistant", "user"]
    assert f"{e['total']:.2f}" in msgs[5]["content"] and msgs[-1]["content"] == e["prompts"][3]


def test_harness_runs_the_stages_with_a_scripted_model():
    task = make_tasks([FAMILY], per_family=1, seed=0)[0]
    e, seen = task.entry, []

    async def model(messages, step):
        seen.append(messages[-1]["content"])
        replies = [json.dumps(e["items"]), f"```python\nprint({e['total']})\n```", f"ANSWER: {e['letter']}",
                   wf.confirmation(e["total"], e["code"])]
        return replies[step], "local" if step % 2 else "cloud"

    traj = run(run_task(task, model))
    assert traj.routes == ["cloud", "local", "cloud", "local"] and traj.correct == 1.0
    assert [s["correct"] for s in traj.stages] == [1.0] * 4
    assert seen[2].startswith("The program printed:")  # the tool output fed the next stage

    async def wrong_total(messages, step):
        replies = [json.dumps(e["items"]), "```python\nprint(1.5)\n```", f"ANSWER: {e['letter']}",
                   wf.confirmation(1.5, e["code"])]
        return replies[step], "cloud"

    traj = run(run_task(task, wrong_total))
    assert [s["correct"] for s in traj.stages] == [1.0, 0.0, 1.0, 0.0] and traj.correct == 0.0
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
