"""Draft features for profiled traces: the checks of `hera_core.checks.drafts` on each step's SLM
output, at the prompt the step had on the LLM's trajectory (rebuilt by replaying the LLM's replies
through the harness; the sandbox's outputs are deterministic). No model runs: the traces hold the
SLM's drafts. Used by `hera train` for the second-stage (draft) predictor."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hera_core.checks.drafts import DRAFT_FEATURE_NAMES, check_draft
from hera_core.offline.harness import program_prelude, run_task
from hera_core.offline.workloads import Task


async def step_prompts(task: Task, llm_replies: list[str]) -> list[list[dict[str, Any]]]:
    """The messages of each step of `task` when every step answers with the LLM's reply."""
    prompts: list[list[dict[str, Any]]] = []

    async def step_fn(messages, k):
        prompts.append([dict(m) for m in messages])
        return (llm_replies[k] if k < len(llm_replies) else ""), "replay"

    await run_task(task, step_fn)
    return prompts


async def add_draft_features(traces: list[dict[str, Any]], tasks: dict[str, Task],
                             progress: Callable[[], None] | None = None) -> int:
    """Adds `draft_features` to every step of every trace whose task is known (in place); returns
    how many steps got them. Steps already carrying them are kept (resumable)."""
    done = 0
    for trace in traces:
        task = tasks.get(trace["task_id"])
        if task is None or all("draft_features" in s for s in trace["steps"]):
            done += sum("draft_features" in s for s in trace["steps"])
            if progress is not None:
                progress()
            continue
        for s, messages in zip(trace["steps"], await step_prompts(task, [s["llm_text"] for s in trace["steps"]])):
            check = check_draft(messages, s["slm_text"], completion_tokens=s.get("slm_completion_tokens"),
                                token_logprobs=s.get("slm_token_logprobs"), prelude=program_prelude(task, messages))
            s["draft_features"] = [float(x) for x in check.features]
            s["draft_feature_names"] = list(DRAFT_FEATURE_NAMES)
            done += 1
        if progress is not None:
            progress()
    return done


async def add_draft_logprobs(trace: dict[str, Any], task: Task, engine) -> None:
    """Teacher-forced token log-probabilities of each step's SLM draft, and the draft features
    recomputed with them (`engine`: the SLM): for traces profiled before the engine recorded them
    while decoding. The prompts are rebuilt once for both."""
    prompts = await step_prompts(task, [s["llm_text"] for s in trace["steps"]])
    for s, messages in zip(trace["steps"], prompts):
        if "slm_token_logprobs" not in s:
            s["slm_token_logprobs"] = [round(x, 4) for x in await engine.score_continuation(messages, s["slm_text"])]
        check = check_draft(messages, s["slm_text"], completion_tokens=s.get("slm_completion_tokens"),
                            token_logprobs=s["slm_token_logprobs"], prelude=program_prelude(task, messages))
        s["draft_features"] = [float(x) for x in check.features]
        s["draft_feature_names"] = list(DRAFT_FEATURE_NAMES)


async def draft_features_file(src: Path, out: Path, tasks: dict[str, Task], engine=None,
                              progress: Callable[[], None] | None = None) -> int:
    """Copy traces from `src` to `out` with draft features (and, given the SLM engine, the drafts'
    log-probabilities) added; resumable: tasks already in `out` are kept as they are."""
    done = {json.loads(line)["task_id"] for line in out.read_text().splitlines() if line.strip()} \
        if out.exists() else set()
    n = 0
    with out.open("a") as f:
        for line in src.read_text().splitlines():
            if not line.strip():
                continue
            trace = json.loads(line)
            task = tasks.get(trace["task_id"])
            if trace["task_id"] not in done and task is not None:
                if engine is not None:
                    await add_draft_logprobs(trace, task, engine)
                else:
                    await add_draft_features([trace], {task.task_id: task})
                f.write(json.dumps(trace) + "\n")
                f.flush()  # each task is on disk as soon as it is done
                n += 1
            if progress is not None:
                progress()
    return n
