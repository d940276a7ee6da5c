"""The BFCL tool-calling workload: its tasks, tools and checker (the bfcl-eval package's own)."""

import json

import pytest

from hera_core.backends.tools import ToolSet
from hera_core.offline import bfcl
from hera_core.offline.harness import first_messages, run_task, task_toolset
from hera_core.offline.workloads import TOOL_FAMILIES, make_tasks
from tests.conftest import run


def first_option(options):
    """BFCL lists the accepted values of an argument; a dict value lists them per key again."""
    value = options[0]
    if isinstance(value, dict):
        return {k: first_option(v) for k, v in value.items() if v and v[0] != ""}
    return value


def reference_calls(task):
    """The first accepted value of every argument of BFCL's ground truth, as OpenAI tool_calls."""
    calls = []
    for entry in task.entry["ground_truth"]:
        (name, args), = entry.items()
        chosen = {k: first_option(v) for k, v in args.items() if v and v[0] != ""}
        calls.append({"id": "x", "type": "function",
                      "function": {"name": bfcl.openai_name(name), "arguments": json.dumps(chosen)}})
    return calls


@pytest.mark.parametrize("family", TOOL_FAMILIES)
def test_every_task_offers_valid_openai_tools(family):
    tasks = make_tasks([family], per_family=1000)
    assert len(tasks) >= 200 and len({t.task_id for t in tasks}) == len(tasks)
    for t in tasks:
        ts = task_toolset(t)
        assert isinstance(ts, ToolSet) and all("." not in n for n in ts.schemas)
        assert first_messages(t)[-1]["role"] == "user"


@pytest.mark.parametrize("family", ["bfcl_simple", "bfcl_multiple", "bfcl_parallel", "bfcl_parallel_multiple"])
def test_the_checker_accepts_the_reference_and_rejects_a_wrong_value(family):
    tasks = make_tasks([family], per_family=20)
    for t in tasks:
        calls = reference_calls(t)
        assert bfcl.score(t.entry, calls) == 1.0, (t.task_id, calls)
        assert bfcl.score(t.entry, []) == 0.0
        wrong = json.loads(calls[0]["function"]["arguments"])
        key = next(iter(wrong), None)
        if key is not None:
            wrong[key] = "certainly-not-this" if not isinstance(wrong[key], str) else 123456789
            calls[0]["function"]["arguments"] = json.dumps(wrong)
            assert bfcl.score(t.entry, calls) == 0.0, t.task_id


def test_irrelevance_is_right_only_without_a_call():
    t = make_tasks(["bfcl_irrelevance"], per_family=1)[0]
    name = next(iter(task_toolset(t).schemas))
    assert bfcl.score(t.entry, []) == 1.0
    assert bfcl.score(t.entry, [{"id": "x", "type": "function", "function": {"name": name, "arguments": "{}"}}]) == 0.0


def test_the_harness_runs_a_tool_task_as_one_step_scored_by_its_calls():
    t = make_tasks(["bfcl_simple"], per_family=1)[0]
    calls = reference_calls(t)
    text = "".join(f"\n<tool_call>\n{json.dumps({'name': c['function']['name'], 'arguments': json.loads(c['function']['arguments'])})}\n</tool_call>"
                   for c in calls)

    async def step(messages, k):
        return text, "scripted"

    traj = run(run_task(t, step))
    assert traj.correct == 1.0 and traj.routes == ["scripted"] and json.loads(traj.answer)[0]["function"]["name"]

    async def wrong(messages, k):
        return "I cannot help.", "scripted"

    assert run(run_task(t, wrong)).correct == 0.0
