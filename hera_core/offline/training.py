"""`hera train`: fit the XGBoost predictor on profiled traces and calibrate kappa(step).

Calibration picks the base threshold that keeps the most steps local while the estimated
accuracy stays within `max_drop` of All-LLM on the calibration split. A task is estimated to
stay correct under a policy when every step the policy sends local has a positive substitution
label (handing that single step to the SLM did not lose the task).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from hera_core.routing.predictor import FEATURE_NAMES, Kappa, Predictor

XGB_PARAMS = {"objective": "binary:logistic", "max_depth": 3, "eta": 0.1, "subsample": 0.9,
              "min_child_weight": 1.0, "eval_metric": "auc", "nthread": 1, "seed": 0}


def rows(traces: list[dict[str, Any]], splits: set[str]) -> tuple[np.ndarray, np.ndarray]:
    X = [s["features"] for t in traces if t["split"] in splits for s in t["steps"]]
    y = [s["label"] for t in traces if t["split"] in splits for s in t["steps"]]
    return np.asarray(X, dtype=np.float32).reshape(-1, len(FEATURE_NAMES)), np.asarray(y, dtype=np.float32)


def auc(y: np.ndarray, p: np.ndarray) -> float:
    """Area under the ROC curve by the rank-sum formula (ties get mean ranks); NaN if one class."""
    pos, neg = int(y.sum()), int(len(y) - y.sum())
    if pos == 0 or neg == 0:
        return float("nan")
    order = np.argsort(p, kind="mergesort")
    ranks = np.empty(len(p))
    sorted_p = p[order]
    i = 0
    while i < len(p):
        j = i
        while j + 1 < len(p) and sorted_p[j + 1] == sorted_p[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[y == 1].sum() - pos * (pos + 1) / 2) / (pos * neg))


@dataclass
class PolicyEstimate:
    threshold_base: float
    accuracy: float  # estimated, from substitution labels
    local_share: float
    llm_accuracy: float


def estimate(traces: list[dict[str, Any]], probs: list[np.ndarray], kappa: Kappa) -> PolicyEstimate:
    correct, local, steps = 0.0, 0, 0
    for t, p in zip(traces, probs):
        local_steps = [s for s, pk in zip(t["steps"], p) if pk >= kappa(s["step"])]
        local += len(local_steps)
        steps += len(t["steps"])
        if all(s["label"] == 1 for s in local_steps):
            correct += t["llm_correct"]
    n = max(1, len(traces))
    return PolicyEstimate(kappa.base, correct / n, local / max(1, steps),
                          sum(t["llm_correct"] for t in traces) / n)


def calibrate(traces: list[dict[str, Any]], predictor: Predictor, max_drop: float,
              per_step: float = 0.02, max_steps: int = 5) -> tuple[Kappa, PolicyEstimate]:
    probs = [predictor.predict(np.asarray([s["features"] for s in t["steps"]], dtype=np.float32).reshape(-1, len(FEATURE_NAMES)))
             for t in traces]
    for base in np.round(np.arange(0.05, 1.0001, 0.01), 2):  # low to high: first feasible keeps most local
        kappa = Kappa(float(base), per_step, max_steps)
        est = estimate(traces, probs, kappa)
        if est.accuracy >= est.llm_accuracy - max_drop:
            return kappa, est
    kappa = Kappa(1.01, per_step, max_steps)  # nothing meets the target: all cloud
    return kappa, estimate(traces, probs, kappa)


def train(traces: list[dict[str, Any]], *, max_drop: float = 0.03, num_rounds: int = 100,
          dask_client=None, meta: dict[str, Any] | None = None) -> tuple[Predictor, dict[str, Any]]:
    import xgboost as xgb

    X, y = rows(traces, {"train"})
    Xv, yv = rows(traces, {"val"})
    if len(y) == 0:
        raise ValueError("no training rows: profile some tasks of the train split first (`hera profile`)")
    if dask_client is not None:
        import dask.array as da
        from xgboost import dask as dxgb

        dtrain = dxgb.DaskDMatrix(dask_client, da.from_array(X, chunks=max(1, len(X) // 2)),
                                  da.from_array(y, chunks=max(1, len(y) // 2)), feature_names=list(FEATURE_NAMES))
        booster = dxgb.train(dask_client, XGB_PARAMS, dtrain, num_boost_round=num_rounds)["booster"]
    else:
        dtrain = xgb.DMatrix(X, label=y, feature_names=list(FEATURE_NAMES))
        booster = xgb.train(XGB_PARAMS, dtrain, num_boost_round=num_rounds)
    booster.feature_names = None  # the file carries names itself; inference passes plain arrays
    predictor = Predictor(model_json=bytes(booster.save_raw("json")))
    calib = [t for t in traces if t["split"] == "val"] or [t for t in traces if t["split"] == "train"]
    kappa, est = calibrate(calib, predictor, max_drop)
    predictor.kappa = kappa
    gain = booster.get_score(importance_type="gain")
    importance = {FEATURE_NAMES[int(k[1:])] if k.startswith("f") else k: round(v, 4) for k, v in gain.items()}
    report = {
        "train_rows": int(len(y)), "val_rows": int(len(yv)), "train_positive_rate": float(y.mean()),
        "auc_train": auc(y, predictor.predict(X)),
        "auc_val": auc(yv, predictor.predict(Xv)) if len(yv) else float("nan"),
        "kappa": {"base": kappa.base, "per_step": kappa.per_step, "max_steps": kappa.max_steps},
        "calibration": {"split": "val" if calib and calib[0]["split"] == "val" else "train",
                        "max_drop": max_drop, "est_accuracy": est.accuracy, "llm_accuracy": est.llm_accuracy,
                        "est_local_share": est.local_share},
        "feature_importance_gain": dict(sorted(importance.items(), key=lambda kv: -kv[1])),
    }
    predictor.meta = {**(meta or {}), **report}
    return predictor, report


def compare_labels(train: list[dict[str, Any]], evals: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Which label predicts substitutability better? Fit the same predictor on each label of the
    train split (the substitution label, and the paper's embedding-similarity label, which
    `similarity.add_similarity` fills in) and score both on held-out splits against each label.
    Also: how well the similarity of the two outputs itself (a hindsight signal) ranks them."""
    import xgboost as xgb

    def xy(traces, key):
        steps = [s for t in traces for s in t["steps"]]
        return (np.asarray([s["features"] for s in steps], dtype=np.float32).reshape(-1, len(FEATURE_NAMES)),
                np.asarray([s[key] for s in steps], dtype=np.float32), steps)

    out: dict[str, Any] = {"trained_on": {}, "similarity_itself": {}}
    for key in ("label", "label_similar"):
        X, y, _ = xy(train, key)
        booster = xgb.train(XGB_PARAMS, xgb.DMatrix(X, label=y), num_boost_round=100)
        res = {}
        for name, traces in evals.items():
            Xe, y_sub, steps = xy(traces, "label")
            _, y_sim, _ = xy(traces, "label_similar")
            p = booster.inplace_predict(Xe)
            res[name] = {"auc_vs_substitution": auc(y_sub, p), "auc_vs_similarity": auc(y_sim, p)}
        out["trained_on"]["substitution" if key == "label" else "similarity"] = res
    for name, traces in evals.items():
        _, y_sub, steps = xy(traces, "label")
        out["similarity_itself"][name] = auc(y_sub, np.asarray([s["similarity"] for s in steps]))
    return out
