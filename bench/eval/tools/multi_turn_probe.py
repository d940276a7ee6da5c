"""Can the SLM or the cloud stand-in do any of BFCL's multi-turn tasks? Measured before any
routing work (issue: tool-calling steps, multi-turn "if the pair can do any of it").

For the first `--tasks` tasks of `multi_turn_base`: the task's API documents are offered as tools
(the model's own chat template renders them), each user turn is answered in up to `--max-steps`
model steps (a step with calls has them run by BFCL's executable API simulators, whose results go
back as `tool` messages; a step without calls ends the turn), and BFCL's multi-turn checker scores
the whole conversation (the simulators' state and results after every turn against the ground
truth's). The model runs in-process (llama.cpp, the same engine as HERA's local one) with a
context long enough for the documents. Resumable: one line per (model, task) in `--out`.

    python bench/eval/tools/multi_turn_probe.py --model qwen2.5-coder-1.5b --tasks 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

from rich.progress import track

from hera_core.backends.llamacpp import LlamaCppEngine
from hera_core.backends.tools import ToolSet
from hera_core.install.models import model_path
from hera_core.offline.bfcl import SYSTEM, _checker, _data_file, openai_tools


def load_tasks(n: int) -> list[dict]:
    from bfcl_eval.constants.executable_backend_config import MULTI_TURN_FUNC_DOC_FILE_MAPPING

    with open(_data_file("BFCL_v4_multi_turn_base.json")) as f:
        entries = [json.loads(line) for line in f if line.strip()][:n]
    with open(_data_file("possible_answer/BFCL_v4_multi_turn_base.json")) as f:
        answers = {a["id"]: a["ground_truth"] for a in map(json.loads, filter(str.strip, f))}
    for e in entries:
        e["function"] = []
        for cls in e["involved_classes"]:
            with open(_data_file(f"multi_turn_func_doc/{MULTI_TURN_FUNC_DOC_FILE_MAPPING[cls]}")) as f:
                e["function"] += [json.loads(line) for line in f if line.strip()]
        e["ground_truth"] = answers[e["id"]]
    return entries


def call_string(call: dict) -> str:
    """An OpenAI tool call as the Python call BFCL's simulators execute."""
    args = json.loads(call["function"]["arguments"] or "{}")
    return f"{call['function']['name']}({', '.join(f'{k}={v!r}' for k, v in args.items())})"


async def run_task(engine: LlamaCppEngine, label: str, entry: dict, max_steps: int, max_tokens: int) -> dict:
    from bfcl_eval.eval_checker.multi_turn_eval.multi_turn_checker import multi_turn_checker
    from bfcl_eval.eval_checker.multi_turn_eval.multi_turn_utils import execute_multi_turn_func_call

    toolset = ToolSet.parse(openai_tools(entry["function"]), "auto")
    messages: list[dict] = [{"role": "system", "content": SYSTEM}]
    decoded: list[list[list[str]]] = []
    steps = invalid = 0
    for turn in entry["question"]:
        messages += turn
        turn_steps: list[list[str]] = []
        for _ in range(max_steps):
            gen = await engine.generate(messages, max_tokens=max_tokens, toolset=toolset)
            steps += 1
            invalid += len(gen.tool_errors)
            if not gen.tool_calls:
                messages.append({"role": "assistant", "content": gen.text})
                break
            calls = [call_string(c) for c in gen.tool_calls]
            results, _ = execute_multi_turn_func_call(calls, entry["initial_config"], entry["involved_classes"],
                                                      label, entry["id"])
            turn_steps.append(calls)
            messages.append({"role": "assistant", "content": gen.text or None, "tool_calls": gen.tool_calls})
            messages += [{"role": "tool", "tool_call_id": c["id"], "content": str(r)}
                         for c, r in zip(gen.tool_calls, results)]
        decoded.append(turn_steps)
    result = multi_turn_checker(decoded, entry["ground_truth"], entry, "multi_turn_base", label)
    return {"valid": bool(result.get("valid")), "error_type": result.get("error_type"), "steps": steps,
            "invalid_calls_dropped": invalid, "calls": decoded}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--tasks", type=int, default=5)
    ap.add_argument("--max-steps", type=int, default=6, help="model steps per user turn")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--n-ctx", type=int, default=12288)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/eval/tools/multi-turn-probe.jsonl")
    args = ap.parse_args()
    _checker()  # installs the one provider table BFCL's checkers read (see hera_core.offline.bfcl)
    out = Path(args.out)
    done = {(r["model"], r["id"]) for r in map(json.loads, out.read_text().splitlines())} if out.exists() else set()
    todo = [e for e in load_tasks(args.tasks) if (args.model, e["id"]) not in done]
    if todo:
        engine = LlamaCppEngine(model_path(args.model), name=args.model, n_ctx=args.n_ctx, n_threads=args.threads,
                                n_slots=1)
        try:
            for entry in track(todo, description=f"multi-turn, {args.model}"):
                t0 = time.perf_counter()
                row = asyncio.run(run_task(engine, f"probe_{args.model}".replace(".", "_").replace("-", "_"), entry,
                                           args.max_steps, args.max_tokens))
                with out.open("a") as f:
                    f.write(json.dumps({"model": args.model, "id": entry["id"], **row,
                                        "seconds": round(time.perf_counter() - t0, 1)}) + "\n")
        finally:
            asyncio.run(engine.close())
    rows = [r for r in map(json.loads, out.read_text().splitlines()) if r["model"] == args.model]
    print(f"{args.model}: {sum(r['valid'] for r in rows)} of {len(rows)} multi_turn_base tasks pass BFCL's checker; "
          f"{sum(r['steps'] for r in rows)} steps, {sum(r['seconds'] for r in rows):.0f} s")


if __name__ == "__main__":
    main()
