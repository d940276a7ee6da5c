import pytest

from hera_core.offline.harness import docstring_examples, extract_answer, extract_code, run_python, run_task
from hera_core.offline.workloads import FAMILIES, make_tasks, normalize_answer, split_of
from tests.conftest import run


def test_extractors():
    assert extract_code("x\n```python\nprint(1)\n```\n") == "print(1)\n"
    assert extract_code("no code") is None
    assert extract_answer("blah\nANSWER: 42") == "42"
    assert extract_answer("answer: `a, b`") == "a, b"
    assert extract_answer("nothing") is None


def test_tool_runs_code_isolated_with_limits():
    assert run_python("print(6*7)") == (True, "42")
    ok, out = run_python("raise ValueError('boom')")
    assert not ok and "ValueError: boom" in out
    ok, out = run_python("while True: pass", timeout_s=1)
    assert not ok
    ok, out = run_python("import os; print(os.environ.get('HOME'))")
    assert ok and out == "None"  # no environment leaks into the tool


def test_tasks_are_deterministic_and_splits_disjoint():
    a = make_tasks(per_family=3, seed=0, split="test")
    b = make_tasks(per_family=3, seed=0, split="test")
    assert [t.task_id for t in a] == [t.task_id for t in b] and len(a) == 3 * len(FAMILIES)
    train = {t.task_id for t in make_tasks(per_family=5, seed=0, split="train")}
    assert not train & {t.task_id for t in a}
    assert all(split_of(t.task_id) == "test" for t in a)


def test_scorers_accept_the_reference_and_reject_others():
    for task in make_tasks(per_family=2, seed=3):
        assert task.score(task.answer) == 1.0
        assert task.score("definitely wrong") == 0.0
        assert task.score(None) == 0.0


@pytest.mark.parametrize("raw,norm", [("94.0", "94"), ("1,234", "1234"), ("['a', 'b']", "a, b"), ("3.5", "3.5")])
def test_answer_normalization(raw, norm):
    assert normalize_answer(raw) == norm


def test_harness_runs_tool_then_final_step_with_a_scripted_model():
    task = make_tasks(["basic_arithmetic"], per_family=1, seed=0)[0]
    expr = task.entry["metadata"].get("expression") or task.question.split("Calculate")[-1].strip(" .=")
    calls = []

    async def model(messages, step):
        calls.append([m["role"] for m in messages])
        if step == 0:
            return f"```python\nprint({expr})\n```", "cloud"
        return "ANSWER: " + messages[-1]["content"].split("\n")[1], "local"

    traj = run(run_task(task, model))
    assert traj.routes == ["cloud", "local"]
    assert calls[1][-2:] == ["assistant", "user"]  # the tool output came back as a user turn
    assert traj.correct == 1.0, (traj.answer, task.answer)


def test_tool_has_no_network():
    ok, out = run_python("import socket; socket.create_connection(('127.0.0.1', 9))")
    assert not ok and "PermissionError" in out  # the sandbox's filter refuses an inet socket
    ok, out = run_python("x = (1,\n")
    assert not ok and "SyntaxError" in out  # reported with the program's own line numbers


def test_humaneval_scorer_runs_the_tests_out_of_process():
    tasks = make_tasks(["humaneval"], per_family=4, seed=0, split="test")
    assert len(tasks) == 4 and all(t.kind == "code" and t.family == "humaneval" for t in tasks)
    for task in tasks:
        solution = task.entry["prompt"] + task.entry["canonical_solution"]
        assert task.score(f"```python\n{solution}```") == 1.0
        assert task.score(task.answer) == 1.0  # a bare body completes the prompt
        assert task.score(f"def {task.entry['entry_point']}(*args):\n    return None\n") == 0.0
        # Exit status 0 alone is not a pass: the tests must have run to the end.
        assert task.score("import os\nos._exit(0)") == 0.0


def test_humaneval_tests_never_run_in_this_process(monkeypatch):
    import hera_core.checks.sandbox as sandbox

    seen = []
    real = sandbox.run_python
    monkeypatch.setattr(sandbox, "run_python", lambda code, **kw: seen.append(code) or real(code, **kw))
    task = make_tasks(["humaneval"], per_family=1, seed=0, split="test")[0]
    assert task.score(task.answer) == 1.0 and seen and f"check({task.entry['entry_point']})" in seen[0]


def test_mmlu_tasks_and_letter_scorer():
    tasks = make_tasks(["mmlu"], per_family=5, seed=0, split="test")
    assert len(tasks) == 5 and all(t.kind == "choice" and t.answer in "ABCD" for t in tasks)
    task = tasks[0]
    assert "\nA. " in task.question and "\nD. " in task.question
    wrong = next(x for x in "ABCD" if x != task.answer)
    assert task.score(task.answer) == 1.0 and task.score(f"({task.answer.lower()})") == 1.0
    assert task.score(f"{task.answer}. because ...") == 1.0
    assert task.score(wrong) == 0.0 and task.score("I am not sure") == 0.0


def test_harness_code_kind_checks_docstring_examples_then_asks_for_a_fix():
    def checkable(task):
        try:
            return any(eval(want) is not None for _, want in docstring_examples(task))
        except Exception:
            return False

    task = next(t for t in make_tasks(["humaneval"], per_family=10, seed=0, split="train") if checkable(t))
    name = task.entry["entry_point"]
    replies = [f"```python\ndef {name}(*args):\n    return None\n```",
               f"```python\n{task.entry['prompt']}{task.entry['canonical_solution']}```"]

    async def model(messages, step):
        return replies[step], "local"

    traj = run(run_task(task, model))
    assert traj.routes == ["local", "local"] and traj.correct == 1.0
    assert "Running the examples from the docstring failed" in traj.messages[3]["content"]
    assert "returned None" in traj.messages[3]["content"]

    async def right_first(messages, step):
        return replies[1], "cloud"

    traj = run(run_task(task, right_first))
    assert traj.routes == ["cloud"] and traj.correct == 1.0  # examples pass: no second step


def test_harness_choice_kind_reasons_then_answers():
    task = make_tasks(["mmlu"], per_family=1, seed=0, split="test")[0]

    async def model(messages, step):
        if step == 0:
            assert "Which option is correct?" in messages[-1]["content"]
            return "Option analysis.", "cloud"
        assert "ANSWER: <letter>" in messages[-1]["content"]
        return f"ANSWER: {task.answer}", "local"

    traj = run(run_task(task, model))
    assert traj.routes == ["cloud", "local"] and traj.correct == 1.0


def test_user_tasks_from_jsonl(tmp_path):
    from hera_core.offline.workloads import load_jsonl_tasks

    path = tmp_path / "tasks.jsonl"
    path.write_text('{"id": "a", "question": "2+2?", "answer": "4", "scorer": "number"}\n\n'
                    '{"id": "b", "question": "Capital of France?", "answer": "Paris", "family": "geo"}\n'
                    '{"id": "c", "question": "Say hi", "answer": "hi", "scorer": "contains"}\n')
    a, b, c = load_jsonl_tasks(str(path))
    assert a.score("4.0") == 1.0 and a.score("5") == 0.0 and a.family == "custom"
    assert b.score("paris") == 1.0 and b.score("Lyon") == 0.0 and b.family == "geo"
    assert c.score("well, hi there") == 1.0
    assert {t.task_id for t in load_jsonl_tasks(str(path), split="test")} <= {"a", "b", "c"}
    path.write_text('{"id": "x", "question": "q"}\n')
    with pytest.raises(ValueError, match="line 1"):
        load_jsonl_tasks(str(path))
    path.write_text('{"id": "x", "question": "q", "answer": "a", "scorer": "llm-judge"}\n')
    with pytest.raises(ValueError, match="scorer must be one of"):
        load_jsonl_tasks(str(path))


def test_compare_with_direct_scores_both_ways_per_family_and_model():
    from hera_core.backends.base import Generation
    from hera_core.offline.harness import compare_with_direct

    tasks = make_tasks(["basic_arithmetic", "mmlu"], per_family=1, seed=0, split="val")

    def SimpleNamespace(text):  # a scripted answer, as an engine returns it
        return Generation(text=text, prompt_tokens=1, completion_tokens=1, latency_s=0.0, ttft_s=0.0,
                          finish_reason="stop")

    class Scripted:  # answers right through the harness, wrong when asked directly
        async def generate(self, messages, max_tokens):
            task = next(t for t in tasks if any(t.question in m["content"] for m in messages))
            direct = messages[0]["role"] == "user"
            if direct:
                return SimpleNamespace(text="ANSWER: nope")
            if task.kind == "choice" or "printed" in messages[-1]["content"]:
                return SimpleNamespace(text=f"ANSWER: {task.answer}")
            return SimpleNamespace(text=f"```python\nprint({task.answer!r})\n```")

    report = run(compare_with_direct(tasks, {"llm": Scripted()}))
    assert set(report) == {"basic_arithmetic", "mmlu"}
    for family in report.values():
        assert family["llm"]["harness"] == {"accuracy": 1.0, "tasks": 1}
        assert family["llm"]["direct"] == {"accuracy": 0.0, "tasks": 1}


@pytest.mark.parametrize("reply,correct", [
    ("Reasoning.\nANSWER: {a}", True),
    ("Reasoning. The final answer is: {a}. Some option text", True),  # format ignored, option named
    ("I think the correct answer is **({a})**", True),
    ("The answer is {b}, not {a}? No: the answer is {a}", True),  # the last one named counts
    ("Reasoning about {a} without a conclusion", False),
    ("The final answer is: {b}.", False),
])
def test_direct_choice_answer_is_read_leniently(reply, correct):
    from hera_core.offline.harness import run_direct

    task = make_tasks(["mmlu"], per_family=1, seed=0, split="val")[0]
    wrong = "A" if task.answer != "A" else "B"

    async def model(messages, step):
        assert "ANSWER: <letter>" in messages[-1]["content"]
        return reply.format(a=task.answer, b=wrong), "cloud"

    assert run(run_direct(task, model)).correct == float(correct)


@pytest.mark.parametrize("reply,correct", [
    ("Reasoning.\nANSWER: {a}", True),
    ("So he has \\(\\boxed{{{a}}}\\) pebbles.", True),  # format ignored, result boxed
    ("\\boxed{{{b}}} first, then \\boxed{{{a}}}", True),  # the last boxed counts
    ("He has {a} pebbles.", False),  # no stated final answer
])
def test_direct_compute_answer_reads_a_boxed_result(reply, correct):
    from hera_core.offline.harness import run_direct

    task = make_tasks(["basic_arithmetic"], per_family=1, seed=0, split="val")[0]
    wrong = str(int(float(task.answer)) + 1)

    async def model(messages, step):
        return reply.format(a=task.answer, b=wrong), "cloud"

    assert run(run_direct(task, model)).correct == float(correct)


# --- agents on the OpenAI tools API (the <family>_tools families) ----------------------------------
def _call(name: str, code: str) -> str:
    import json

    from hera_core.backends.tools import CLOSE, OPEN

    return f"\n{OPEN}\n" + json.dumps({"name": name, "arguments": {"code": code}}) + f"\n{CLOSE}"


def test_tool_agent_calls_run_python_gets_a_tool_message_then_must_answer():
    from hera_core.offline.harness import task_toolset

    task = make_tasks(["basic_arithmetic_tools"], per_family=1, seed=0, split="test")[0]
    assert task.task_id.endswith("@tools") and split_of(task.task_id) == "test" and task.kind == "compute_tools"
    expr = task.entry["metadata"].get("expression") or task.question.split("Calculate")[-1].strip(" .=")
    seen = []

    async def model(messages, step):
        seen.append((step, task_toolset(task, messages).choice, [m["role"] for m in messages]))
        if step == 0:
            return _call("run_python", "print(1/0)"), "local"  # fails: the agent must call again
        if step == 1:
            return _call("run_python", f"print({expr})"), "cloud"
        return "ANSWER: " + messages[-1]["content"], "local"

    traj = run(run_task(task, model))
    assert traj.routes == ["local", "cloud", "local"] and traj.correct == 1.0, traj.answer
    assert [choice for _, choice, _ in seen] == ["required", "required", "none"]  # retry after an error, then answer
    assert seen[2][2][-4:] == ["assistant", "tool", "assistant", "tool"]
    call = traj.messages[2]
    assert call["tool_calls"][0]["id"] == "call_0_0" and call["tool_calls"][0]["function"]["name"] == "run_python"
    assert traj.messages[3] == {"role": "tool", "tool_call_id": "call_0_0",
                                "content": traj.messages[3]["content"]} and \
        traj.messages[3]["content"].startswith("Error:")


def test_tool_agent_for_humaneval_runs_the_docstring_examples_as_its_tool():
    from hera_core.offline.harness import message_text

    task = make_tasks(["humaneval_tools"], per_family=1, seed=0, split="train")[0]
    solution = task.entry["prompt"] + task.entry["canonical_solution"]

    async def model(messages, step):
        if step == 0:
            return _call("run_examples", solution), "local"
        return f"```python\n{solution}```", "local"

    traj = run(run_task(task, model))
    assert traj.correct == 1.0 and traj.messages[3]["content"] == "All examples pass."
    assert message_text(traj.messages[2]) == _call("run_examples", solution)  # the step's text, for replays


def test_tool_agent_that_never_answers_scores_zero_and_stops():
    task = make_tasks(["gsm_symbolic_tools"], per_family=1, seed=0)[0]

    async def model(messages, step):
        return _call("run_python", "print(1/0)"), "local"

    traj = run(run_task(task, model))
    assert len(traj.routes) == 3 and traj.correct == 0.0 and traj.answer is None
