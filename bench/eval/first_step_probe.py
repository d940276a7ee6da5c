"""Does the SLM's confidence over its first few greedy tokens tell whether a task's first step
can stay local? A diagnostic, not part of the router.

At the first step the prefill's logit features rank substitutability at chance (the next token is
nearly always the opening of a code block). This decodes the first `--tokens` greedy tokens of the
first step with the SLM and ranks the traces' substitution labels by the mean top-1 probability
(and entropy) over those positions: over all tasks, and within each family, where a signal that
only tells the families apart scores 0.5.

    python bench/eval/first_step_probe.py --traces bench/eval/traces-test.jsonl --tokens 16
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import numpy as np
from rich.progress import track

from hera_core.backends.llamacpp import LlamaCppEngine
from hera_core.backends.llamacpp.batch import Span
from hera_core.native.features import logit_features
from hera_core.offline.harness import first_messages
from hera_core.install.models import model_path
from hera_core.offline.profiling import load_traces
from hera_core.offline.training import auc
from hera_core.offline.workloads import make_tasks


def probe(engine: LlamaCppEngine, messages, n_tokens: int) -> np.ndarray:
    """[1 + decoded, 3] logit features: the prefill's last position, then each greedy token's.
    Drives the engine's scheduler, cache and batch directly: generate does not hand out per-token logits."""
    placed = engine.scheduler.eval_prompt(engine.tokenize_messages(messages))
    slot, logits, pos = placed.slot, placed.logits, len(placed.tokens)
    rows = [logits]
    for _ in range(n_tokens):
        token = int(np.argmax(logits))
        if engine.model.is_eog(token):
            break
        logits = engine.model.batch.decode([Span([token], slot, pos)])[0]
        engine.cache.append(slot, [token], logits)  # the slot no longer ends at the prompt
        pos += 1
        rows.append(logits)
    return logit_features(np.stack(rows).astype(np.float32))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--traces", default="bench/eval/traces-test.jsonl")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    traces = {t["task_id"]: t for t in load_traces(args.traces)}
    families = sorted({t["family"] for t in traces.values()})
    split = next(iter(traces.values()))["split"]
    tasks = [t for t in make_tasks(families, per_family=400, split=split) if t.task_id in traces]
    if len(tasks) != len(traces):
        raise SystemExit(f"{len(traces) - len(tasks)} traced tasks not found in the built-in families")
    engine = LlamaCppEngine(model_path(args.model), n_ctx=4096, n_threads=args.threads, n_slots=1)
    rows = []
    for task in track(tasks, description="probing first steps"):
        feats = probe(engine, first_messages(task), args.tokens)
        rows.append((task.family, traces[task.task_id]["steps"][0]["label"], feats))

    def scores(fn):
        groups = defaultdict(lambda: ([], []))
        for family, label, feats in rows:
            for key in ("all", family):
                groups[key][0].append(fn(feats))
                groups[key][1].append(label)
        return {k: (auc(np.asarray(y), np.asarray(s)), len(y) - sum(y)) for k, (s, y) in groups.items()}

    signals = {
        "prefill top-1 probability": lambda f: f[0, 1],
        f"mean top-1 probability, first {args.tokens} tokens": lambda f: f[1:, 1].mean() if len(f) > 1 else f[0, 1],
        f"-mean entropy, first {args.tokens} tokens": lambda f: -(f[1:, 0].mean() if len(f) > 1 else f[0, 0]),
    }
    result = {name: scores(fn) for name, fn in signals.items()}
    print(f"first steps: {len(rows)}, not substitutable: {sum(1 for _, y, _ in rows if not y)}")
    for name, by in result.items():
        within = ", ".join(f"{k} {a:.2f} ({neg} neg)" for k, (a, neg) in sorted(by.items()) if k != "all")
        print(f"{name}: AUC {by['all'][0]:.3f}; within families: {within}")
    print(json.dumps({name: {k: round(a, 3) for k, (a, _) in by.items()} for name, by in result.items()}))


if __name__ == "__main__":
    main()
