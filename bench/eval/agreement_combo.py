"""Does sample agreement add to the draft stage at a task's first step? (issue: local agreement)

Inputs, all committed: the agreement probe's rows for validation and test first steps
(`agreement_probe.py`: the share of 4 SLM samples whose answer agrees with the greedy draft's), the
traces with their draft features (`drafts-*.jsonl`) and the predictor with a draft stage
(`predictor-draft.json`, trained on the train split). The combination is chosen on validation
only: a logistic regression (XGBoost's linear booster with a weak L2 penalty, 0.01 per example,
about scikit-learn's default on these 69 steps) over (agreement share, logit of the draft stage's
P), fitted on the validation first steps; then every signal is scored on the test first steps by
AUC of the substitution label, overall and within each family (a signal that only tells families
apart scores 0.5 within a family; a family with no negative first step is left out). First steps
whose greedy answer is free text (no program output, no `ANSWER:` value: most of MMLU's reasoning
steps) are left out: samples are not voted on there.

    python bench/eval/agreement_combo.py --out bench/eval/agreement_combo.json
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from hera_core.checks.drafts import votable
from hera_core.offline.profiling import load_traces
from hera_core.offline.training import auc
from hera_core.routing.predictor import Predictor


def first_steps(agreement: Path, drafts: Path, predictor: Predictor) -> list[dict]:
    traces = {t["task_id"]: t for t in load_traces(drafts)}
    rows = []
    for line in agreement.read_text().splitlines():
        r = json.loads(line)
        if not votable(r["greedy"]) or not r["keys"]:
            continue
        step = traces[r["task_id"]]["steps"][0]
        x = np.asarray([step["features"] + step["draft_features"]], dtype=np.float32)
        rows.append({"family": r["family"], "label": step["label"], "agree": r["agree"],
                     "p_draft": float(predictor.draft.predict(x)[0])})
    return rows


def features(rows: list[dict]) -> np.ndarray:
    p = np.clip([r["p_draft"] for r in rows], 1e-4, 1 - 1e-4)
    return np.stack([[r["agree"] for r in rows], np.log(p / (1 - p))], axis=1)


def aucs(rows: list[dict], scores: np.ndarray) -> dict:
    groups = defaultdict(lambda: ([], []))
    for r, s in zip(rows, scores):
        for key in ("all", r["family"]):
            groups[key][0].append(r["label"])
            groups[key][1].append(s)
    out = {k: round(auc(np.asarray(y, np.float32), np.asarray(p)), 3) for k, (y, p) in groups.items()}
    within = [v for k, v in out.items() if k != "all" and not np.isnan(v)]
    return {"all": out["all"], "within_family_mean": round(float(np.mean(within)), 3),
            "families": {k: v for k, v in sorted(out.items()) if k != "all"},
            "negatives": int(sum(1 - r["label"] for r in rows)), "steps": len(rows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="bench/eval")
    ap.add_argument("--out", default="bench/eval/agreement_combo.json")
    args = ap.parse_args()
    import xgboost as xgb

    d = Path(args.dir)
    predictor = Predictor.load(d / "predictor-draft.json")
    val = first_steps(d / "agreement-val.jsonl", d / "drafts-val.jsonl", predictor)
    test = first_steps(d / "agreement.jsonl", d / "drafts-test.jsonl", predictor)
    combo = xgb.train({"booster": "gblinear", "objective": "binary:logistic", "lambda": 0.01, "alpha": 0.0,
                       "updater": "coord_descent", "nthread": 1},
                      xgb.DMatrix(features(val), label=[r["label"] for r in val]), num_boost_round=500)
    weights = json.loads(combo.save_raw("json"))["learner"]["gradient_booster"]["model"]["weights"]
    report = {"fitted_on": "val first steps", "coefficients": {"agree": round(float(weights[0]), 3),
                                                                "logit_p_draft": round(float(weights[1]), 3)}}
    for split, rows in (("val", val), ("test", test)):
        report[split] = {
            "agreement": aucs(rows, np.asarray([r["agree"] for r in rows])),
            "draft_stage": aucs(rows, np.asarray([r["p_draft"] for r in rows])),
            "combined": aucs(rows, combo.predict(xgb.DMatrix(features(rows)))),
        }
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    for split in ("val", "test"):
        for name, res in report[split].items():
            print(f"{split} {name}: AUC {res['all']} (within family {res['within_family_mean']}; "
                  f"{res['negatives']} negatives of {res['steps']})")


if __name__ == "__main__":
    main()
