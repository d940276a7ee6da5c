"""Does the SLM's agreement with itself tell whether a task's first step can stay local? A
diagnostic for the draft checks (issue: local agreement), not part of the router yet.

For the first step of test tasks, the SLM's greedy answer (from the traces) and `--k` samples
(temperature 0.7, one engine call: the prompt evaluated once, the samples decoding together) are
reduced to a vote key: what the answer's program prints (run in the sandbox), else its
`ANSWER:` value, else its text. The signal is the share of the samples that agree with the greedy
answer; it ranks the traces' substitution labels by AUC, over all tasks and within each family
(where a signal that only tells the families apart scores 0.5). Also: what the samples cost in
time against the greedy draft alone. Resumable: one line per task in `--out`.

    python bench/eval/agreement_probe.py --per-family 5 --k 4 --out bench/eval/agreement.jsonl

The rows are also what `hera train --votes` calibrates the vote stage on (validation tasks), and
`--into-cache` files the samples' answers and time into a completion cache (the committed one is
xz-compressed), where `hera eval` replays HERA's vote stage from (the same draws: temperature
0.7, seed 0, k samples in one call, as the evaluator would draw them live):

    python bench/eval/agreement_probe.py --out bench/eval/agreement.jsonl --into-cache bench/eval/completions.sqlite.xz
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from rich.progress import track

from hera_core.backends.llamacpp import LlamaCppEngine
from hera_core.checks.drafts import votable, vote_key
from hera_core.install.models import model_path
from hera_core.offline.harness import first_messages
from hera_core.offline.profiling import load_traces
from hera_core.offline.training import auc
from hera_core.offline.workloads import make_tasks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--traces", default="bench/eval/traces-test.jsonl")
    ap.add_argument("--per-family", type=int, default=5)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=384)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/eval/agreement.jsonl")
    ap.add_argument("--no-timing", action="store_true", help="skip decoding the draft again just to time it")
    ap.add_argument("--into-cache", metavar="CACHE", help="file the rows of --out into this completion cache and stop")
    args = ap.parse_args()
    if args.into_cache:
        into_cache(args)
        return

    traces = {t["task_id"]: t for t in load_traces(args.traces)}
    families = sorted({t["family"] for t in traces.values()})
    split = next(iter(traces.values()))["split"]
    by_family: dict[str, list] = defaultdict(list)
    for task in make_tasks(families, per_family=400, split=split):
        if task.task_id in traces and len(by_family[task.family]) < args.per_family:
            by_family[task.family].append(task)
    tasks = [t for fam in families for t in by_family[fam]]
    out = Path(args.out)
    done = {json.loads(line)["task_id"] for line in out.read_text().splitlines()} if out.exists() else set()
    engine = LlamaCppEngine(model_path(args.model), n_ctx=4096, n_threads=args.threads, n_slots=8)
    for task in track([t for t in tasks if t.task_id not in done], description="sampling first steps"):
        first = traces[task.task_id]["steps"][0]
        messages = first_messages(task)
        greedy = vote_key(first["slm_text"])
        if not votable(greedy):  # free text: the vote stage never samples it (and samples never repeat it)
            with out.open("a") as f:
                f.write(json.dumps({"task_id": task.task_id, "family": task.family, "label": first["label"],
                                    "greedy": greedy, "keys": [], "agree": None, "majority": None,
                                    "draft_s": None, "samples_s": 0.0}) + "\n")
            continue
        draft_s = None
        if not args.no_timing:
            t0 = time.perf_counter()
            asyncio.run(engine.generate(messages, max_tokens=args.max_tokens))  # the draft alone, for the time
            draft_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        samples = asyncio.run(engine.generate_samples(messages, args.k, max_tokens=args.max_tokens,
                                                      temperature=0.7, seed=0))
        samples_s = time.perf_counter() - t0
        keys = [vote_key(g.text) for g in samples]
        row = {"task_id": task.task_id, "family": task.family, "label": first["label"], "greedy": greedy,
               "keys": keys, "agree": sum(k == greedy for k in keys) / len(keys),
               "majority": max(keys.count(k) for k in set(keys)) / len(keys),
               "draft_s": draft_s, "samples_s": samples_s}
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")

    rows = [r for r in map(json.loads, out.read_text().splitlines()) if r["keys"] and votable(r["greedy"])]
    for signal in ("agree", "majority"):
        groups = defaultdict(lambda: ([], []))
        for r in rows:
            for key in ("all", r["family"]):
                groups[key][0].append(r[signal])
                groups[key][1].append(r["label"])
        res = {k: (auc(np.asarray(y), np.asarray(s)), len(y)) for k, (s, y) in groups.items()}
        print(f"{signal}: AUC {res['all'][0]:.3f} over {res['all'][1]} first steps; within families: "
              + ", ".join(f"{k} {a:.2f} (n={n})" for k, (a, n) in sorted(res.items()) if k != "all"))
    timed = [r for r in rows if r["draft_s"] is not None]
    if not timed:
        return
    ratio = np.mean([r["samples_s"] for r in timed]) / np.mean([r["draft_s"] for r in timed])
    print(f"time: {args.k} samples in one call take {ratio:.2f}x the greedy draft alone "
          f"(mean {np.mean([r['samples_s'] for r in timed]):.1f} s against {np.mean([r['draft_s'] for r in timed]):.1f} s)")


def into_cache(args) -> None:
    """The probe's samples as the evaluator's vote cache entries (`{model}:votes{k}` features of
    each task's first-step prompt)."""
    import lzma
    import shutil
    import tempfile

    from hera_core.backends.caching import CompletionCache

    rows = [json.loads(line) for line in Path(args.out).read_text().splitlines()]
    tasks = {t.task_id: t for t in make_tasks(sorted({r["family"] for r in rows}), per_family=400,
                                              split=load_traces(args.traces)[0]["split"])}
    path = Path(args.into_cache)
    work = Path(tempfile.mkdtemp()) / "cache.sqlite"
    if path.suffix == ".xz":
        with lzma.open(path) as src, open(work, "wb") as dst:
            shutil.copyfileobj(src, dst)
    else:
        shutil.copyfile(path, work)
    cache = CompletionCache(work)
    for r in (r for r in rows if r["keys"]):
        cache.put_features(f"{args.model}:votes{len(r['keys'])}", first_messages(tasks[r["task_id"]]),
                           {"keys": r["keys"], "samples_s": r["samples_s"]})
    cache._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    cache._db.execute("VACUUM")
    cache.close()
    if path.suffix == ".xz":
        with open(work, "rb") as src, lzma.open(path, "wb", preset=9) as dst:
            shutil.copyfileobj(src, dst)
    else:
        shutil.copyfile(work, path)
    print(f"{sum(bool(r['keys']) for r in rows)} first steps' votes filed into {path}")


if __name__ == "__main__":
    main()
