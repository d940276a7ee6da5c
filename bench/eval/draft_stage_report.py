"""How well does each signal rank substitutability, and what does the draft stage buy?

Reads traces that carry draft features (`hera drafts`, or a `hera profile` run that recorded
them), trains as `hera train` does (first stage and draft stage on the train split, calibration on
val), and reports on the test split:
- AUC of the substitution label, all steps and first steps, overall and within each family (a
  signal that only tells the families apart scores 0.5 within a family), for the first stage
  (prefill only) and the draft stage (prefill + draft checks + draft log-probabilities);
- leave-one-family-out: both stages trained on the other families, AUC on the held-out one;
- the label-based estimate of each policy on test (accuracy, local share, drafted share).

    python bench/eval/draft_stage_report.py --dir bench/eval --out bench/eval/draft_stage.json
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from hera_core.offline.profiling import load_traces
from hera_core.offline.training import (auc, estimate, estimate_routes, threshold, train,
                                        two_stage_routes)
from hera_core.routing.predictor import Predictor


def aucs(traces, score, first_only=False):
    groups = defaultdict(lambda: ([], []))
    for t in traces:
        for s in t["steps"]:
            if first_only and s["step"] != 0:
                continue
            for key in ("all", t["family"]):
                groups[key][0].append(s["label"])
                groups[key][1].append(score(s))
    out = {k: round(auc(np.asarray(y, np.float32), np.asarray(p)), 3) for k, (y, p) in groups.items()}
    fams = [v for k, v in out.items() if k != "all" and not np.isnan(v)]
    out["within_family_mean"] = round(float(np.mean(fams)), 3) if fams else float("nan")
    return out


def scorers(pred: Predictor):
    one = lambda s: float(pred.predict(np.asarray([s["features"]], np.float32))[0])
    two = lambda s: float(pred.draft.predict(np.asarray([s["features"] + s["draft_features"]], np.float32))[0])
    return one, two


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="bench/eval", help="folder with drafts-{train,val,test}.jsonl")
    ap.add_argument("--out", default="bench/eval/draft_stage.json")
    args = ap.parse_args()
    d = Path(args.dir)
    tr, va, te = (load_traces(d / f"drafts-{split}.jsonl") for split in ("train", "val", "test"))

    pred, rep = train(tr + va, max_drop=0.03)
    one, two = scorers(pred)
    report = {"trained": {k: rep[k] for k in ("auc_train", "auc_val", "kappa", "calibration")},
              "draft_stage": {k: rep["draft_stage"][k] for k in ("auc_train", "auc_val", "band", "keep_threshold",
                                                                 "calibration", "feature_importance_gain")}}
    report["test_auc"] = {
        "prefill_all_steps": aucs(te, one), "prefill_first_step": aucs(te, one, True),
        "draft_all_steps": aucs(te, two), "draft_first_step": aucs(te, two, True),
        "logprob_mean_first_step": aucs(te, lambda s: s["draft_features"][12], True),
    }
    p1 = [pred.predict(np.asarray([s["features"] for s in t["steps"]], np.float32)) for t in te]
    p2 = [pred.draft.predict(np.asarray([s["features"] + s["draft_features"] for s in t["steps"]], np.float32))
          for t in te]
    est1 = estimate(te, p1, pred.kappa)
    flags2 = two_stage_routes(te, p1, p2, pred.kappa, pred.draft.band, pred.draft.keep_threshold)
    est2 = estimate_routes(te, flags2, pred.kappa.base)
    drafted = np.mean([abs(a - threshold(pred.kappa, s)) < pred.draft.band for t, p in zip(te, p1)
                       for s, a in zip(t["steps"], p)])
    report["test_estimate"] = {
        "llm_accuracy": est1.llm_accuracy,
        "hera_prefill": {"accuracy": est1.accuracy, "local_share": est1.local_share},
        "hera_draft": {"accuracy": est2.accuracy, "local_share": est2.local_share, "drafted_share": float(drafted)},
    }
    # Leave one family out: both stages trained on the other families' train+val traces.
    lofo = {}
    for fam in sorted({t["family"] for t in te}):
        rest = [t for t in tr + va if t["family"] != fam]
        held = [t for t in te if t["family"] == fam]
        p, _ = train(rest, max_drop=0.03)
        o, w = scorers(p)
        lofo[fam] = {"prefill_first": aucs(held, o, True)["all"], "draft_first": aucs(held, w, True)["all"],
                     "prefill_all": aucs(held, o)["all"], "draft_all": aucs(held, w)["all"]}
    vals = lambda key: [v[key] for v in lofo.values() if not np.isnan(v[key])]
    lofo["mean"] = {k: round(float(np.mean(vals(k))), 3) for k in ("prefill_first", "draft_first", "prefill_all", "draft_all")}
    report["leave_one_family_out_auc"] = lofo
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps({k: report[k] for k in ("test_auc", "test_estimate", "leave_one_family_out_auc")}, indent=1))


if __name__ == "__main__":
    main()
