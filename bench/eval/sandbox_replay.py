"""Replays the committed draft checks in the current sandbox: every step of bench/eval/drafts-*.jsonl
is checked again (its SLM draft, at the prompt it had) and the draft features compared with the
ones the file holds (computed in the sandbox of the time). The features carry everything a check
decides (the program ran, printed a number, passed the prompt's examples), so equal features mean
the same programs gave the same outcomes.

    .venv/bin/python bench/eval/sandbox_replay.py            # all three splits
    .venv/bin/python bench/eval/sandbox_replay.py --split test --limit 50
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from hera_core.checks.drafts import DRAFT_FEATURE_NAMES, check_draft
from hera_core.checks.sandbox import default_sandbox
from hera_core.offline.drafts import step_prompts
from hera_core.offline.workloads import make_tasks

HERE = Path(__file__).resolve().parent


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


async def replay(split: str, limit: int | None, bar: Progress) -> tuple[int, int, list[str]]:
    traces = [json.loads(line) for line in (HERE / f"drafts-{split}.jsonl").read_text().splitlines() if line.strip()]
    traces = traces[:limit] if limit else traces
    families = sorted({t["family"] for t in traces})
    tasks = {t.task_id: t for t in make_tasks(families, per_family=400, seed=0, split=split)}
    missing = [t["task_id"] for t in traces if t["task_id"] not in tasks]
    if missing:
        raise SystemExit(f"{len(missing)} traced tasks not regenerated (first: {missing[0]})")
    job = bar.add_task(split, total=len(traces))
    steps = 0
    changed: list[str] = []
    for trace in traces:
        prompts = await step_prompts(tasks[trace["task_id"]], [s["llm_text"] for s in trace["steps"]])
        for s, messages in zip(trace["steps"], prompts):
            names = s.get("draft_feature_names", list(DRAFT_FEATURE_NAMES))
            old = dict(zip(names, s["draft_features"]))
            check = check_draft(messages, s["slm_text"], completion_tokens=s.get("slm_completion_tokens"),
                                token_logprobs=s.get("slm_token_logprobs"))
            new = dict(zip(DRAFT_FEATURE_NAMES, (float(x) for x in check.features)))
            diff = [n for n in names if n in new and not same(float(old[n]), new[n])]
            steps += 1
            if diff:
                changed.append(f"{trace['task_id']} step {s['step']}: " +
                               ", ".join(f"{n} {old[n]} -> {new[n]}" for n in diff))
        bar.advance(job)
    return len(traces), steps, changed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", choices=["train", "val", "test", "all"], default="all")
    ap.add_argument("--limit", type=int, default=None, help="first N tasks of each split")
    args = ap.parse_args()
    status = default_sandbox().require()
    print(f"sandbox: {status.mechanism} ({status.detail})")
    splits = ["train", "val", "test"] if args.split == "all" else [args.split]
    total_steps, all_changed = 0, []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("ETA"), TimeRemainingColumn()) as bar:
        for split in splits:
            n_tasks, n_steps, changed = asyncio.run(replay(split, args.limit, bar))
            print(f"{split}: {n_tasks} tasks, {n_steps} steps, {len(changed)} with other draft features")
            total_steps += n_steps
            all_changed += changed
    for line in all_changed:
        print("  " + line)
    print(f"total: {total_steps} steps, {len(all_changed)} changed")
    raise SystemExit(1 if all_changed else 0)


if __name__ == "__main__":
    main()
