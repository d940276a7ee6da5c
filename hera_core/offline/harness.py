"""The agent harness: a multi-step agent with a Python tool, one chat call per step.

By the task's kind:
- compute: step 0 asks for a short program that prints the answer (code is the strength of the
  Qwen2.5-Coder models); the harness runs it in the sandbox and sends back its output; if it
  failed, one repair step; the last step asks for the final answer as `ANSWER: <answer>`.
- code (HumanEval): step 0 writes the function; the harness runs the examples of the task's
  docstring against it (never the hidden tests) and, if one fails, asks for one fix.
- choice (MMLU): step 0 reasons briefly about the options, step 1 answers with a letter.
- tool (BFCL): one step with the task's functions offered as tools; its calls are the answer,
  scored by BFCL's checker (none at all is right for the irrelevance category).
- compute_tools / code_tools (the `<family>_tools` families): the same tasks, with the agent
  talking through the OpenAI tools API as today's agent frameworks do: it calls a `run_python`
  tool (HumanEval: `run_examples`, which runs the docstring's examples against a function), the
  harness runs it and sends back a `tool` message, up to two calls; then it answers.
- workflow (#33, hera_core.offline.workflows): one step per stage of a four-stage order-to-quote
  task (extract, compute with the sandbox, choose a policy rule, confirm); each stage's prompt
  follows the last reply (with the program's output), the confirmation is the task's answer.
The conversation grows step by step, so every step resends the whole prefix (what the KV cache
reuses).
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from hera_core.backends.base import Engine, Generation, Message
from hera_core.backends.tools import CLOSE, OPEN, ToolSet, parse_calls
from hera_core.checks.drafts import docstring_examples as examples_in
from hera_core.checks.drafts import extract_answer, extract_code, run_examples
from hera_core.checks.sandbox import run_python
from hera_core.offline import bfcl, workflows
from hera_core.offline.workloads import Task, humaneval_program

SYSTEM = ("You are a careful problem solver with a Python tool. Keep answers short. "
          "When asked for code, reply with one ```python code block that prints the answer.")
CODE_PROMPT = "{question}\n\nWrite a short Python program that computes and prints the answer."
TOOL_OK = "The program printed:\n{output}\nReply with only the final answer, as: ANSWER: <answer>"
TOOL_FAIL = "The program failed:\n{output}\nFix the program. Reply with one ```python code block."
FINAL_FAIL = "The program failed again:\n{output}\nReason it out briefly and reply with: ANSWER: <answer>"


# (messages, step) -> (assistant text, route label); the router, a fixed model, or a replay.
StepFn = Callable[[list[Message], int], Awaitable[tuple[str, str]]]


@dataclass
class Trajectory:
    task: Task
    messages: list[Message] = field(default_factory=list)
    routes: list[str] = field(default_factory=list)  # route of each step
    answer: str | None = None
    correct: float = 0.0
    stages: list[dict[str, Any]] = field(default_factory=list)  # a workflow's stages: answer, correct


AGENT_SYSTEM = ("You are a careful problem solver with tools. Keep answers short. Use the tool to compute or "
                "test, then answer from what it returned.")
PY_TOOL_PROMPT = ("{question}\n\nCall run_python with a short program that prints the answer. When it has "
                  "answered, reply with only the final answer, as: ANSWER: <answer>")
EXAMPLES_TOOL_PROMPT = ("Complete this Python function. Call run_examples with the whole function and its imports to "
                        "test it, then reply with the final function in one ```python code block.\n\n"
                        "```python\n{question}```")
_CODE_PARAM = {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]}
RUN_PYTHON = {"type": "function", "function": {
    "name": "run_python", "description": "Run a Python program and return what it prints, or its error.",
    "parameters": _CODE_PARAM}}
RUN_EXAMPLES = {"type": "function", "function": {
    "name": "run_examples", "description": "Run the examples of the function's docstring against it; "
                                           "returns whether they pass, or the first failure.",
    "parameters": _CODE_PARAM}}
AGENT_TOOL_KINDS = ("compute_tools", "code_tools")
MAX_TOOL_CALLS = 2  # calls of a tool-using agent's tool (one repair)
TOOL_FAILED = ("Error:", "Failed:")  # how the harness's tool results say the call did not work

FUNCTION_PROMPT = ("Complete this Python function. Reply with one ```python code block that contains the whole "
                   "function and its imports.\n\n```python\n{question}```")
EXAMPLES_FAIL = "Running the examples from the docstring failed:\n{output}\nFix the function. Reply with one ```python code block."
CHOICE_PROMPT = "{question}\n\nWhich option is correct? Think it through in at most three short sentences."
CHOICE_FINAL = "Reply with only the letter of the correct option, as: ANSWER: <letter>"


def first_messages(task: Task) -> list[Message]:
    """The conversation a task starts from: the prompt of its first step."""
    if task.kind == "workflow":
        return workflows.first_messages(task.entry)
    if task.kind == "tool":
        return [{"role": "system", "content": bfcl.SYSTEM}, *[dict(m) for m in task.entry["messages"]]]
    if task.kind in AGENT_TOOL_KINDS:
        prompt = PY_TOOL_PROMPT if task.kind == "compute_tools" else EXAMPLES_TOOL_PROMPT
        return [{"role": "system", "content": AGENT_SYSTEM}, {"role": "user", "content": prompt.format(question=task.question)}]
    prompt = {"code": FUNCTION_PROMPT, "choice": CHOICE_PROMPT}.get(task.kind, CODE_PROMPT)
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt.format(question=task.question)}]


def docstring_examples(task: Task) -> list[tuple[str, str]]:
    """(call, expected) pairs from the task's docstring (of its entry point)."""
    return examples_in(task.question, entry=task.entry.get("entry_point", ""))


def check_examples(task: Task, code: str) -> tuple[bool, str]:
    """Run the docstring's examples against the model's function, in the sandbox."""
    return run_examples(humaneval_program(task.entry, code), docstring_examples(task))


def task_toolset(task: Task, messages: list[Message] | None = None) -> ToolSet | None:
    """The tools a task's step offers (tool tasks, tool-using agents), else None. A tool-using
    agent must call its tool first and again after a failed result (up to MAX_TOOL_CALLS), and
    must answer (tool_choice "none") after a result that worked or the last allowed one."""
    if task.kind in AGENT_TOOL_KINDS:
        results = [m.get("content") or "" for m in messages or [] if m.get("role") == "tool"]
        retry = not results or (results[-1].startswith(TOOL_FAILED) and len(results) < MAX_TOOL_CALLS)
        return ToolSet.parse([RUN_PYTHON if task.kind == "compute_tools" else RUN_EXAMPLES],
                             tool_choice="required" if retry else "none")
    if task.kind != "tool":
        return None
    return ToolSet.parse(bfcl.openai_tools(task.entry["functions"]))


def _with_calls(content: str, calls: list[dict[str, Any]]) -> str:
    """Content, then OpenAI tool calls as `<tool_call>` blocks (the form the harness keeps in the
    conversation and parses back)."""
    return content + "".join(f"\n{OPEN}\n" + json.dumps({"name": c["function"]["name"],
                                                         "arguments": json.loads(c["function"]["arguments"])})
                             + f"\n{CLOSE}" for c in calls)


def step_text(gen: Generation) -> str:
    """A step's answer as one text: its content, then its tool calls."""
    return _with_calls(gen.text, gen.tool_calls)


def message_text(m: Message) -> str:
    """An assistant message as its step's text (`step_text`'s form): content, then its calls."""
    return _with_calls(m.get("content") or "", m.get("tool_calls") or [])


def program_prelude(task: Task, messages: list[Message]) -> str:
    """Code a program written at this step runs after, as the task's tool runs it (a workflow's
    stage: the names its prompt says are defined, with the run's own upstream answers); "" for
    other tasks. A draft's program is checked with it."""
    return workflows.program_prelude(task.entry, messages) if task.kind == "workflow" else ""


async def generate_step(engine: Engine, task: Task, messages: list[Message], max_tokens: int) -> str:
    """One step of `task` on `engine` (offering the task's tools, if any), as `step_text`."""
    toolset = task_toolset(task, messages)
    kwargs = {"toolset": toolset} if toolset is not None else {}
    return step_text(await engine.generate(messages, max_tokens=max_tokens, **kwargs))


async def run_task(task: Task, step_fn: StepFn, max_code_attempts: int = 2) -> Trajectory:
    traj = Trajectory(task, messages=first_messages(task))

    async def step() -> str:
        text, route = await step_fn(traj.messages, len(traj.routes))
        traj.routes.append(route)
        traj.messages.append({"role": "assistant", "content": text})
        return text

    if task.kind in AGENT_TOOL_KINDS:
        return await _run_tool_agent(traj, step)
    if task.kind == "workflow":  # one step per stage; the last stage's answer is the task's
        traj.stages = await workflows.run_stages(task.entry, traj.messages, step)
        traj.answer = traj.stages[-1]["answer"]
        traj.correct = task.score(traj.answer)
        return traj
    if task.kind == "tool":
        text = await step()
        _, calls, errors = parse_calls(text, task_toolset(task))
        traj.answer = json.dumps(calls)
        traj.correct = 0.0 if errors else task.score(traj.answer)
        return traj
    if task.kind == "choice":
        await step()
        traj.messages.append({"role": "user", "content": CHOICE_FINAL})
        text = await step()
        traj.answer = extract_answer(text) or text.strip() or None
        traj.correct = task.score(traj.answer)
        return traj
    if task.kind == "code":
        for attempt in range(max_code_attempts):
            text = await step()
            code = extract_code(text) or text
            traj.answer = code
            if attempt == max_code_attempts - 1:
                break
            ok, output = check_examples(task, code)
            if ok:
                break
            traj.messages.append({"role": "user", "content": EXAMPLES_FAIL.format(output=output)})
        traj.correct = task.score(traj.answer)
        return traj

    for attempt in range(max_code_attempts):
        text = await step()
        answer = extract_answer(text)
        code = extract_code(text)
        if code is None:
            if answer is not None:  # answered directly: accept it
                traj.answer = answer
                traj.correct = task.score(answer)
                return traj
            ok, output = False, "no ```python code block found"
        else:
            ok, output = run_python(code)
        if ok:
            traj.messages.append({"role": "user", "content": TOOL_OK.format(output=output)})
            break
        last = attempt == max_code_attempts - 1
        traj.messages.append({"role": "user", "content": (FINAL_FAIL if last else TOOL_FAIL).format(output=output)})
    text = await step()
    traj.answer = extract_answer(text) or (text.strip().splitlines() or [""])[-1].strip() or None
    traj.correct = task.score(traj.answer)
    return traj


async def _run_tool_agent(traj: Trajectory, step: Callable[[], Awaitable[str]]) -> Trajectory:
    """An agent on the tools API: a step either calls the task's tool (its assistant message
    carries OpenAI `tool_calls`, the harness answers each with a `tool` message) or answers, as
    `task_toolset` asks of it."""
    task = traj.task
    last_code, text = None, ""
    for k in range(MAX_TOOL_CALLS + 1):
        toolset = task_toolset(task, traj.messages)
        content, calls, errors = parse_calls(await step(), toolset)
        text = content  # what precedes a call: an answer says nothing more
        if not calls or errors or toolset.choice == "none":
            break
        ids = [f"call_{k}_{i}" for i in range(len(calls))]  # deterministic: replays hit the cache
        # (content stripped: `message_text` of this message parses back to the same message)
        traj.messages[-1] = {"role": "assistant", "content": content.strip() or None,
                             "tool_calls": [{**c, "id": i} for c, i in zip(calls, ids)]}
        for c, call_id in zip(calls, ids):
            last_code = str(json.loads(c["function"]["arguments"]).get("code", ""))
            if task.kind == "compute_tools":
                ok, output = run_python(last_code)
                result = output if ok else f"{TOOL_FAILED[0]} {output}"
            else:
                ok, output = check_examples(task, last_code)
                result = "All examples pass." if ok else f"{TOOL_FAILED[1]} {output}"
            traj.messages.append({"role": "tool", "tool_call_id": call_id, "content": result})
    if task.kind == "compute_tools":
        traj.answer = extract_answer(text) or (text.strip().splitlines() or [""])[-1].strip() or None
    else:
        traj.answer = extract_code(text) or last_code
    traj.correct = task.score(traj.answer)
    return traj


DIRECT_PROMPT = "{question}\n\nThink briefly, then give the final answer on the last line as: ANSWER: <{slot}>"
# A direct answer that ignores the requested format but still states its result counts: the
# baseline should not lose on formatting alone. Models trained on math write \boxed{44}; on
# choices, "the correct answer is: D. Pricing".
BOXED_RE = re.compile(r"\\boxed\{([^{}]*)\}")
CHOICE_FALLBACK_RE = re.compile(r"answer is\s*:?\s*\**\s*\(?([A-D])\b")


def direct_answer(text: str, kind: str) -> str | None:
    """The answer of a direct reply: its ANSWER line, else its last boxed result, else (choice)
    the last option it names as the answer."""
    answer = extract_answer(text)
    if answer is not None:
        return answer
    named = BOXED_RE.findall(text) or (CHOICE_FALLBACK_RE.findall(text) if kind == "choice" else [])
    return named[-1].strip() if named else None


async def run_direct(task: Task, step_fn: StepFn) -> Trajectory:
    """Baseline: one direct call, to check the harness does not make a model worse. For code
    tasks the one call is the harness's first step, scored as it is (no example check, no fix);
    a tool task is one call either way."""
    if task.kind in ("tool", "workflow", *AGENT_TOOL_KINDS):
        return await run_task(task, step_fn)
    if task.kind == "code":
        traj = Trajectory(task, messages=first_messages(task))
    else:
        slot = "letter" if task.kind == "choice" else "answer"
        traj = Trajectory(task, messages=[{"role": "user", "content": DIRECT_PROMPT.format(question=task.question,
                                                                                          slot=slot)}])
    text, route = await step_fn(traj.messages, 0)
    traj.routes.append(route)
    traj.messages.append({"role": "assistant", "content": text})
    traj.answer = (extract_code(text) or text) if task.kind == "code" else direct_answer(text, task.kind)
    traj.correct = task.score(traj.answer)
    return traj


async def compare_with_direct(tasks: list[Task], models: dict[str, Engine], max_tokens: int = 384,
                              progress: Callable[[], None] | None = None) -> dict[str, Any]:
    """Accuracy per family and model through the harness and with one direct call."""
    from collections import defaultdict

    scores: dict[str, dict[str, dict[str, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for task in tasks:
        for name, engine in models.items():
            async def step(messages, k, engine=engine, name=name, task=task):
                return await generate_step(engine, task, messages, max_tokens), name

            scores[task.family][name]["harness"].append((await run_task(task, step)).correct)
            scores[task.family][name]["direct"].append((await run_direct(task, step)).correct)
        if progress is not None:
            progress()
    return {family: {name: {way: {"accuracy": sum(v) / len(v), "tasks": len(v)} for way, v in ways.items()}
                     for name, ways in by_model.items()} for family, by_model in scores.items()}
