"""`hera profile`: traces of both models on every step of the agent harness, for training.

For each task: the LLM's trajectory step by step; at each of its steps the SLM's prefill
features and output on the same prefix; and the substitution label: does the final answer stay
correct when only this step runs on the SLM (the rest on the LLM)? Both models decode greedily
through the completion cache, so reruns and substitutions replay shared prefixes for free.

A multi-stage workflow (kind "workflow") can be labelled per stage instead (`--labels stage`,
`profile_stages_task`): each model answers each stage on its true upstream outputs, and a stage's
label is "the SLM's answer is no worse than the LLM's" (docs/workloads.md says how the two labels
differ).

Output is append-only JSONL, one line per task, flushed as each task finishes: a killed run
resumes where it stopped.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from hera_core.backends.base import Engine, Message
from hera_core.checks.drafts import DRAFT_FEATURE_NAMES, check_draft
from hera_core.offline import workflows
from hera_core.offline.userfiles import read_lines
from hera_core.native.features import logit_features
from hera_core.progress import progress_bar
from hera_core.offline.harness import (first_messages, generate_step, message_text, program_prelude, run_task,
                                      step_text, task_toolset)
from hera_core.routing.familiarity import opening_text
from hera_core.routing.predictor import (FEATURE_NAMES, FEATURE_SCHEMA, TOOL_FEATURE_NAMES, V1_SCHEMA, V2_SCHEMA,
                                         feature_matrix,
                                         structure_features, tool_features)
from hera_core.offline.workloads import TOOL_FAMILIES, Task, split_of, tool_tasks

MAX_TOKENS = 384


async def profile_task(task: Task, slm: Engine, llm: Engine, seed: int = 0) -> dict[str, Any]:
    prefixes: list[list[Message]] = []

    async def llm_step(messages: list[Message], step: int):
        prefixes.append([dict(m) for m in messages])
        return await generate_step(llm, task, messages, MAX_TOKENS), "cloud"

    base = await run_task(task, llm_step)
    steps = []
    for k, messages in enumerate(prefixes):
        toolset = task_toolset(task, messages)
        pre = await slm.prefill(messages, **({"toolset": toolset} if toolset is not None else {}))
        feats = feature_matrix(logit_features(pre.logits[None, :]),
                               [structure_features(k, pre.prompt_tokens, messages, toolset)])[0]
        slm_gen = await slm.generate(messages, max_tokens=MAX_TOKENS,
                                     **({"toolset": toolset} if toolset is not None else {}))
        slm_text = step_text(slm_gen)
        logprobs = slm_gen.extra.get("token_logprobs")
        if logprobs is None:  # a completion cached before the engine recorded them: score it
            logprobs = await slm.score_continuation(messages, slm_gen.text)
        check = check_draft(messages, slm_text, completion_tokens=slm_gen.completion_tokens,
                            token_logprobs=logprobs, prelude=program_prelude(task, messages))

        async def substituted(msgs: list[Message], step: int, k=k):
            engine = slm if step == k else llm
            return await generate_step(engine, task, msgs, MAX_TOKENS), "local" if step == k else "cloud"

        sub = await run_task(task, substituted)
        steps.append({
            "step": k, "features": [float(x) for x in feats], "prompt_tokens": pre.prompt_tokens,
            "llm_text": message_text(base.messages[len(messages)]), "slm_text": slm_text,
            "slm_completion_tokens": slm_gen.completion_tokens,
            "slm_token_logprobs": [round(float(x), 4) for x in logprobs],
            "draft_features": [float(x) for x in check.features], "draft_feature_names": list(DRAFT_FEATURE_NAMES),
            "sub_correct": sub.correct,
            # Good enough = handing this step to the SLM does not lose the task.
            "label": 1 if sub.correct >= base.correct else 0,
        })
    return {"task_id": task.task_id, "family": task.family, "split": split_of(task.task_id, seed),
            "llm_correct": base.correct, "llm_steps": len(prefixes), "schema": FEATURE_SCHEMA,
            "feature_names": list(FEATURE_NAMES), "steps": steps,
            "opening": opening_text(first_messages(task))}  # for `hera train`'s familiarity check


async def profile_stages_task(task: Task, slm: Engine, llm: Engine, seed: int = 0) -> dict[str, Any]:
    """A workflow task's trace with stage labels: at each stage, on its true prefix (the reference
    answers of the stages before it), the SLM's prefill features, both models' answers scored, and
    the label 1 when the SLM's stage answer scores at least the LLM's. The task's llm_correct is the
    LLM right at every stage (what a chained LLM run needs, estimated without running it)."""
    if task.kind != "workflow":
        raise ValueError(f"stage labels are for multi-stage workflows; {task.task_id} is a {task.kind} task")
    steps = []
    for k in range(len(workflows.STAGES)):
        messages = workflows.true_prefix(task.entry, k)
        pre = await slm.prefill(messages)
        feats = feature_matrix(logit_features(pre.logits[None, :]),
                               [structure_features(k, pre.prompt_tokens, messages)])[0]
        slm_gen = await slm.generate(messages, max_tokens=MAX_TOKENS)
        llm_text = await generate_step(llm, task, messages, MAX_TOKENS)
        slm_text = step_text(slm_gen)
        logprobs = slm_gen.extra.get("token_logprobs")
        if logprobs is None:  # a completion cached before the engine recorded them: score it
            logprobs = await slm.score_continuation(messages, slm_gen.text)
        check = check_draft(messages, slm_text, completion_tokens=slm_gen.completion_tokens, token_logprobs=logprobs,
                            prelude=workflows.prelude(task.entry, None, k))
        scored = [workflows.score_stage(task.entry, k, workflows.stage_answer(task.entry, k, text)[0])
                  for text in (slm_text, llm_text)]
        steps.append({
            "step": k, "stage": workflows.STAGES[k], "features": [float(x) for x in feats],
            "prompt_tokens": pre.prompt_tokens, "llm_text": llm_text, "slm_text": slm_text,
            "slm_completion_tokens": slm_gen.completion_tokens,
            "slm_token_logprobs": [round(float(x), 4) for x in logprobs],
            "draft_features": [float(x) for x in check.features], "draft_feature_names": list(DRAFT_FEATURE_NAMES),
            "slm_stage_correct": scored[0], "llm_stage_correct": scored[1],
            "label": 1 if scored[0] >= scored[1] else 0,
        })
    return {"task_id": task.task_id, "family": task.family, "split": split_of(task.task_id, seed),
            "llm_correct": float(all(s["llm_stage_correct"] for s in steps)), "llm_steps": len(steps),
            "labels": "stage", "schema": FEATURE_SCHEMA, "feature_names": list(FEATURE_NAMES), "steps": steps,
            "opening": opening_text(first_messages(task))}


def done_task_ids(path: Path) -> set[str]:
    if not path.exists():
        return set()
    done = set()
    for line in path.read_text().splitlines():
        try:
            done.add(json.loads(line)["task_id"])
        except (json.JSONDecodeError, KeyError):
            continue  # a line cut by a kill: that task is profiled again
    return done


def load_traces(path: str | Path) -> list[dict[str, Any]]:
    """The traces of a profile run, in the current feature schema (v1 traces are upgraded)."""
    out = []
    for line in read_lines(path, "traces file", "make it with `hera profile`"):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return [_upgraded(t) if t.get("schema") in (V1_SCHEMA, V2_SCHEMA) else t for t in out
            if t.get("schema") in (FEATURE_SCHEMA, V1_SCHEMA, V2_SCHEMA)]


def _upgraded(trace: dict[str, Any]) -> dict[str, Any]:
    """A v1 or v2 trace in today's schema. v2 lacks the answer schema's size: 0, since no task a
    profile runs asks for a structured answer. v1 lacks the tool features too. Its steps' prompts
    are not in the trace, so they are rebuilt where they can be: a task of a non-tool family offers
    no tools (all zero); a BFCL task is one step, its opening messages and tools (from the task).
    Anything else: missing (NaN, which the forest and XGBoost read as missing)."""
    if trace.get("schema") == V2_SCHEMA:
        steps = [{**s, "features": list(s["features"]) + [0.0]} for s in trace["steps"]]
        return {**trace, "schema": FEATURE_SCHEMA, "feature_names": list(FEATURE_NAMES), "steps": steps}
    tools = [float("nan")] * len(TOOL_FEATURE_NAMES)
    if trace["family"] not in TOOL_FAMILIES:
        tools = tool_features([], None)
    elif trace.get("llm_steps") == 1:
        task = _bfcl_task(trace["family"], trace["task_id"])
        if task is not None:
            tools = tool_features(first_messages(task), task_toolset(task))
    steps = [{**s, "features": list(s["features"]) + tools + [0.0]} for s in trace["steps"]]
    return {**trace, "schema": FEATURE_SCHEMA, "feature_names": list(FEATURE_NAMES), "steps": steps}


@functools.lru_cache(maxsize=8)
def _bfcl_tasks(family: str) -> dict[str, Task]:
    return {t.task_id: t for t in tool_tasks(family)}


def _bfcl_task(family: str, task_id: str) -> Task | None:
    return _bfcl_tasks(family).get(task_id)


LABELS = {"substitution": profile_task, "stage": profile_stages_task}


async def profile(tasks: list[Task], slm: Engine, llm: Engine, out: Path, seed: int = 0,
                  progress: bool = True, labels: str = "substitution") -> Path:
    """Trace `tasks` into `out` (appended; tasks already there are skipped), labelled as `labels`
    says (LABELS: "substitution", or "stage" for workflow tasks)."""
    trace_task = LABELS[labels]
    out.parent.mkdir(parents=True, exist_ok=True)
    done = done_task_ids(out)
    todo = [t for t in tasks if t.task_id not in done]
    with progress_bar("profiling", len(tasks), completed=len(tasks) - len(todo), enabled=progress) as bar:
        for task in todo:
            record = await trace_task(task, slm, llm, seed)
            with open(out, "a") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
            bar.advance()
    return out
