"""The agent harness: a multi-step agent with a Python tool, one chat call per step.

Step 0 asks for a short program that prints the answer (code is the strength of the Qwen2.5-Coder
models); the harness runs it in a sandboxed subprocess and sends back its output; if it failed,
one repair step; the last step asks for the final answer as `ANSWER: <answer>`. The conversation
grows step by step, so every step resends the whole prefix (what the KV cache reuses).
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from .engines.base import Message
from .workloads import Task

SYSTEM = ("You are a careful problem solver with a Python tool. Keep answers short. "
          "When asked for code, reply with one ```python code block that prints the answer.")
CODE_PROMPT = "{question}\n\nWrite a short Python program that computes and prints the answer."
TOOL_OK = "The program printed:\n{output}\nReply with only the final answer, as: ANSWER: <answer>"
TOOL_FAIL = "The program failed:\n{output}\nFix the program. Reply with one ```python code block."
FINAL_FAIL = "The program failed again:\n{output}\nReason it out briefly and reply with: ANSWER: <answer>"

CODE_RE = re.compile(r"```(?:python|py)?\s*\n(.*?)```", re.S)
ANSWER_RE = re.compile(r"ANSWER:\s*(.+)", re.I)

# (messages, step) -> (assistant text, route label); the router, a fixed model, or a replay.
StepFn = Callable[[list[Message], int], Awaitable[tuple[str, str]]]


@dataclass
class Trajectory:
    task: Task
    messages: list[Message] = field(default_factory=list)
    routes: list[str] = field(default_factory=list)  # route of each step
    answer: str | None = None
    correct: float = 0.0


def extract_code(text: str) -> str | None:
    m = CODE_RE.search(text)
    if m:
        return m.group(1)
    return None


def extract_answer(text: str) -> str | None:
    m = ANSWER_RE.search(text)
    if not m:
        return None
    return m.group(1).strip().strip("`").strip()


def run_python(code: str, timeout_s: float = 5.0) -> tuple[bool, str]:
    """Run model-written code in an isolated subprocess (no site, no env, temp cwd, time limit)."""
    def limits() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
        resource.setrlimit(resource.RLIMIT_CPU, (int(timeout_s), int(timeout_s)))

    with tempfile.TemporaryDirectory(prefix="hera-tool-") as cwd:
        try:
            proc = subprocess.run([sys.executable, "-I", "-c", code], cwd=cwd, capture_output=True, text=True,
                                  timeout=timeout_s, env={}, preexec_fn=limits)
        except subprocess.TimeoutExpired:
            return False, f"timed out after {timeout_s:.0f}s"
    if proc.returncode != 0:
        return False, (proc.stderr.strip().splitlines() or ["error"])[-1][:300]
    out = proc.stdout.strip()
    return True, (out[:500] if out else "(nothing)")


def first_messages(task: Task) -> list[Message]:
    """The conversation a task starts from: the prompt of its first step."""
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": CODE_PROMPT.format(question=task.question)}]


async def run_task(task: Task, step_fn: StepFn, max_code_attempts: int = 2) -> Trajectory:
    traj = Trajectory(task, messages=first_messages(task))

    async def step() -> str:
        text, route = await step_fn(traj.messages, len(traj.routes))
        traj.routes.append(route)
        traj.messages.append({"role": "assistant", "content": text})
        return text

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


DIRECT_PROMPT = "{question}\n\nThink briefly, then give the final answer on the last line as: ANSWER: <answer>"


async def run_direct(task: Task, step_fn: StepFn) -> Trajectory:
    """Baseline: one direct call, to check the harness does not make a model worse."""
    traj = Trajectory(task, messages=[{"role": "user", "content": DIRECT_PROMPT.format(question=task.question)}])
    text, route = await step_fn(traj.messages, 0)
    traj.routes.append(route)
    traj.messages.append({"role": "assistant", "content": text})
    traj.answer = extract_answer(text)
    traj.correct = task.score(traj.answer)
    return traj
