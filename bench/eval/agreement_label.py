"""How good is the label HERA can make from served traffic alone? The agreement label
(hera_core.checks.agreement: the SLM's draft and the cloud's answer of a step agree) against the
ground-truth substitution label of the committed traces (the task's final answer stays right when
only this step runs on the SLM), on every step of bench/eval/traces-{train,val,test}.jsonl.

Reports, per split, rule and family: how many steps each rule labels, the precision of
"substitutable" (the share of steps labelled substitutable that the ground truth calls so too), its
recall; the token-F1 threshold of the `text` rule scanned on train; and the AUC against the true
labels of test of a predictor trained on agreement labels vs one trained on the true labels (the
same XGBoost settings as `hera train`). Writes bench/eval/learn/labels.json.

    .venv/bin/python bench/eval/agreement_label.py
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from hera_core.checks.agreement import TEXT_F1, step_agreement, token_f1
from hera_core.checks.sandbox import default_sandbox
from hera_core.offline.drafts import step_prompts
from hera_core.offline.profiling import load_traces
from hera_core.offline.training import XGB_PARAMS, auc, rows
from hera_core.offline.workloads import make_tasks

HERE = Path(__file__).resolve().parent
OUT = HERE / "learn" / "labels.json"


def last_user(messages) -> str:
    return next((m["content"] for m in reversed(messages) if m["role"] == "user" and isinstance(m["content"], str)), "")


async def label_split(split: str, bar: Progress) -> list[dict]:
    traces = load_traces(HERE / f"traces-{split}.jsonl")
    tasks = {t.task_id: t for t in make_tasks(sorted({t["family"] for t in traces}), per_family=400, seed=0,
                                              split=split)}
    job = bar.add_task(split, total=len(traces))
    out = []
    for trace in traces:
        prompts = await step_prompts(tasks[trace["task_id"]], [s["llm_text"] for s in trace["steps"]])
        for s, messages in zip(trace["steps"], prompts):
            a = await asyncio.to_thread(step_agreement, last_user(messages), s["llm_text"], s["slm_text"])
            s["agreement"] = int(a.substitutable)
            out.append({"task_id": trace["task_id"], "family": trace["family"], "step": s["step"],
                        "rule": a.rule, "agree": int(a.substitutable), "label": int(s["label"]),
                        "f1": token_f1(s["llm_text"], s["slm_text"])})
        bar.advance(job)
    return out, traces


def summary(items: list[dict]) -> dict:
    agreed = [x for x in items if x["agree"]]
    positives = [x for x in items if x["label"]]
    return {"steps": len(items), "labelled_substitutable": len(agreed),
            "precision": round(sum(x["label"] for x in agreed) / len(agreed), 4) if agreed else None,
            "recall": round(sum(x["agree"] for x in positives) / len(positives), 4) if positives else None,
            "true_positive_rate": round(len(positives) / len(items), 4) if items else None}


def grouped(items: list[dict], key: str) -> dict:
    groups = defaultdict(list)
    for x in items:
        groups[x[key] if key != "family_step" else f"{x['family']}#{x['step']}"].append(x)
    return {k: summary(v) for k, v in sorted(groups.items())}


def fit(traces: list[dict], label_key: str):
    import xgboost as xgb

    relabelled = [{**t, "steps": [{**s, "label": s[label_key]} for s in t["steps"]]} for t in traces]
    X, y = rows(relabelled, {"train"})
    booster = xgb.train(XGB_PARAMS, xgb.DMatrix(X, label=y), num_boost_round=100)
    return booster


def main() -> None:
    print(f"sandbox: {default_sandbox().require().detail}")
    labels, traces = {}, {}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("ETA"), TimeRemainingColumn()) as bar:
        for split in ("train", "val", "test"):
            labels[split], traces[split] = asyncio.run(label_split(split, bar))
    report = {"text_f1_threshold": TEXT_F1}
    for split, items in labels.items():
        report[split] = {"all": summary(items), "by_rule": grouped(items, "rule"),
                         "by_family_step": grouped(items, "family_step")}
    text_train = [x for x in labels["train"] if x["rule"] == "text"]
    report["text_threshold_scan_train"] = {
        f"{t:.1f}": summary([{**x, "agree": int(x["f1"] >= t)} for x in text_train]) for t in np.arange(0.3, 1.0, 0.1)}
    import xgboost as xgb

    for t in traces["train"]:
        for s in t["steps"]:
            s["true_label"] = s["label"]
    X_test, y_test = rows(traces["test"], {"test"})
    dtest = xgb.DMatrix(X_test)
    report["predictor_auc_on_test_true_labels"] = {
        "trained_on_agreement_labels": round(auc(y_test, fit(traces["train"], "agreement").predict(dtest)), 4),
        "trained_on_true_labels": round(auc(y_test, fit(traces["train"], "true_label").predict(dtest)), 4),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: report[k] for k in ("predictor_auc_on_test_true_labels",)}, indent=1))
    for split in labels:
        print(split, report[split]["all"], "\n  by rule:", report[split]["by_rule"])
    print(f"written {OUT}")


if __name__ == "__main__":
    main()
