"""Stage-level profile of workflow tasks (#33): both models on every stage given the true upstream
outputs. Resumable: appends one JSON line per task to the output and skips tasks already there.
With --chained, each model runs whole tasks through the harness instead (its own upstream
outputs), the per-stage and per-task accuracy of an all-SLM or all-LLM agent.

    nice -n 19 .venv/bin/python bench/eval/workflows/stage_profile.py --tasks 12 --threads 2
    nice -n 19 .venv/bin/python bench/eval/workflows/stage_profile.py --chained --tasks 12 --threads 2

--compare-labels STAGE SUBSTITUTION: how the stage labels of `hera profile --labels stage` and the
substitution labels of `hera profile` agree on the tasks both traced, per stage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections import defaultdict
from pathlib import Path

from hera_core.backends.llamacpp import LlamaCppEngine
from hera_core.install.models import model_path
from hera_core.offline.harness import generate_step, run_task
from hera_core.offline.workloads import make_tasks
from hera_core.offline.workflows import STAGES, entries, profile_stages, score_stage, stage_answer

MODELS = {"slm": "qwen2.5-coder-0.5b", "llm": "qwen2.5-coder-1.5b"}


def summary(path: Path) -> dict:
    """Per-stage accuracy of each model, rescored from the recorded replies with today's scorer."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    by_id = {e["task_id"]: e for e in entries("workflow_quote")}
    acc: dict = defaultdict(lambda: defaultdict(list))
    for r in rows:
        for k, s in enumerate(r["stages"]):
            for m in MODELS:
                acc[m][s["stage"]].append(score_stage(by_id[r["task_id"]], k, stage_answer(by_id[r["task_id"]], k, s[m]["text"])[0]))
    return {"tasks": len(rows), **{m: {st: round(sum(v) / len(v), 3) for st, v in acc[m].items()} for m in acc}}


def chained_summary(path: Path) -> dict:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    res: dict = {"tasks": len(rows)}
    for m in MODELS:
        res[m] = {st: round(sum(r[m]["stages"][k]["correct"] for r in rows) / max(len(rows), 1), 3)
                  for k, st in enumerate(STAGES)}
        res[m]["task"] = round(sum(r[m]["correct"] for r in rows) / max(len(rows), 1), 3)
    return res


def compare_labels(stage_path: Path, sub_path: Path) -> dict:
    """Per stage: steps both traced, how many labels agree, and the disagreements each way."""
    def by_task(path: Path) -> dict:
        return {t["task_id"]: t for t in (json.loads(x) for x in path.read_text().splitlines() if x.strip())}

    stage, sub = by_task(stage_path), by_task(sub_path)
    out: dict = {"tasks": len(stage.keys() & sub.keys())}
    for k, name in enumerate(STAGES):
        pairs = [(stage[t]["steps"][k]["label"], sub[t]["steps"][k]["label"]) for t in sorted(stage.keys() & sub.keys())
                 if len(stage[t]["steps"]) > k and len(sub[t]["steps"]) > k]
        out[name] = {"steps": len(pairs), "agree": sum(a == b for a, b in pairs),
                     "stage_1_substitution_0": sum(a > b for a, b in pairs),
                     "stage_0_substitution_1": sum(a < b for a, b in pairs)}
    return out


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--chained", action="store_true", help="whole tasks through the harness, per model")
    ap.add_argument("--summary", action="store_true", help="only print the per-stage accuracy of what is there")
    ap.add_argument("--compare-labels", nargs=2, metavar=("STAGE", "SUBSTITUTION"),
                    help="traces of `hera profile --labels stage` and of `hera profile`: label agreement per stage")
    args = ap.parse_args()
    if args.compare_labels:
        print(json.dumps(compare_labels(*map(Path, args.compare_labels))))
        return
    out = Path(args.out or f"bench/eval/workflows/{'chained' if args.chained else 'stage_profile'}.jsonl")
    if args.summary:
        print(json.dumps(chained_summary(out) if args.chained else summary(out)))
        return
    done = {json.loads(x)["task_id"] for x in out.read_text().splitlines() if x.strip()} if out.exists() else set()
    engines = {k: LlamaCppEngine(model_path(v), name=v, n_ctx=4096, n_threads=args.threads) for k, v in MODELS.items()}
    if args.chained:
        for task in sorted(make_tasks(["workflow_quote"], per_family=10**6),
                           key=lambda t: int(t.task_id.rsplit("-", 1)[1]))[:args.tasks]:
            if task.task_id in done:
                continue
            row = {"task_id": task.task_id}
            for m, engine in engines.items():
                async def step(messages, k, engine=engine, task=task):
                    return await generate_step(engine, task, messages, 256), m
                traj = await run_task(task, step)
                row[m] = {"correct": traj.correct, "stages": traj.stages,
                          "replies": [x["content"] for x in traj.messages if x["role"] == "assistant"]}
            with open(out, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(task.task_id, {m: [s["correct"] for s in row[m]["stages"]] for m in MODELS}, flush=True)
        print(json.dumps(chained_summary(out)))
        return
    for e in entries("workflow_quote")[:args.tasks]:
        if e["task_id"] in done:
            continue
        row = await profile_stages(e, engines)
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(e["task_id"], [(s["stage"], s["slm"]["correct"], s["llm"]["correct"]) for s in row["stages"]], flush=True)
    print(json.dumps(summary(out)))
    assert len(STAGES) == 4


if __name__ == "__main__":
    asyncio.run(main())
