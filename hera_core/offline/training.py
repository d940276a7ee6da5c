"""`hera train`: fit the XGBoost predictor on profiled traces and calibrate kappa(step).

Calibration picks the base threshold that keeps the most steps local while the estimated
accuracy stays within `max_drop` of All-LLM on the calibration split. A task is estimated to
stay correct under a policy when every step the policy sends local has a positive substitution
label (handing that single step to the SLM did not lose the task).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from hera_core.checks.drafts import staged_agreement, votable
from hera_core.config import PriceSettings
from hera_core.errors import UsageError
from hera_core.routing.familiarity import fit_familiarity
from hera_core.routing.predictor import (DRAFT_STAGE_FEATURE_NAMES, FEATURE_NAMES, PROMPT_TOKENS_COLUMN, CostWeight,
                                         DraftStage, Kappa, Predictor, VoteStage, Workload)

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


def step_probs(predictor: Predictor, traces: list[dict[str, Any]]) -> list[np.ndarray]:
    """The predictor's P for every traced step, one array per task."""
    return [predictor.predict(np.asarray([s["features"] for s in t["steps"]], dtype=np.float32)
                              .reshape(-1, len(FEATURE_NAMES))) for t in traces]


def threshold(kappa: Kappa, s: dict[str, Any]) -> float:
    """A traced step's threshold, as the runtime computes it."""
    return kappa.at(s["step"], s["features"][PROMPT_TOKENS_COLUMN])


def kappa_routes(traces: list[dict[str, Any]], probs: list[np.ndarray], kappa: Kappa) -> list[list[bool]]:
    return [[bool(pk >= threshold(kappa, s)) for s, pk in zip(t["steps"], p)] for t, p in zip(traces, probs)]


def estimate(traces: list[dict[str, Any]], probs: list[np.ndarray], kappa: Kappa) -> PolicyEstimate:
    return estimate_routes(traces, kappa_routes(traces, probs, kappa), kappa.base)


def estimate_routes(traces: list[dict[str, Any]], local: list[list[bool]], threshold_base: float) -> PolicyEstimate:
    """The task's outcome when the flagged steps run on the SLM: with one step local, the outcome
    profiled for exactly that (`sub_correct`, which counts a step the SLM does better too); with
    several, the LLM's outcome if every one of them has a positive substitution label, else 0."""
    correct, n_local, steps = 0.0, 0, 0
    for t, flags in zip(traces, local):
        local_steps = [s for s, f in zip(t["steps"], flags) if f]
        n_local += len(local_steps)
        steps += len(t["steps"])
        if len(local_steps) == 1 and "sub_correct" in local_steps[0]:
            correct += local_steps[0]["sub_correct"]
        elif all(s["label"] == 1 for s in local_steps):
            correct += t["llm_correct"]
    n = max(1, len(traces))
    return PolicyEstimate(threshold_base, correct / n, n_local / max(1, steps),
                          sum(t["llm_correct"] for t in traces) / n)


def calibrate(traces: list[dict[str, Any]], predictor: Predictor, max_drop: float,
              per_step: float = 0.02, max_steps: int = 5, weighed: bool = True) -> tuple[Kappa, PolicyEstimate]:
    """kappa's base (the predictor's cost weight kept, unless not `weighed`): the most steps local
    whose estimated accuracy stays within `max_drop` of All-LLM on `traces`."""
    probs = step_probs(predictor, traces)
    weight = predictor.kappa.cost if weighed else None
    for base in np.round(np.arange(0.05, 1.0001, 0.01), 2):  # low to high: first feasible keeps most local
        kappa = Kappa(float(base), per_step, max_steps, weight)
        est = estimate(traces, probs, kappa)
        if est.accuracy >= est.llm_accuracy - max_drop:
            return kappa, est
    kappa = Kappa(1.01, per_step, max_steps, weight)  # nothing meets the target: all cloud
    return kappa, estimate(traces, probs, kappa)


# --- one cloud budget across a task's steps ------------------------------------------------------
COST_GAMMAS = (0.0, 0.5, 1.0, 1.5, 2.0)  # candidate weights of a step's expected cloud cost; 0: kappa alone


def chars_per_token(traces: list[dict[str, Any]]) -> float:
    """Characters per token of the models' completions, measured on the SLM's traced drafts (the pair
    share Qwen2.5's tokenizer), to count the cloud's traced outputs in tokens."""
    chars = sum(len(s["slm_text"]) for t in traces for s in t["steps"] if s.get("slm_completion_tokens"))
    tokens = sum(s["slm_completion_tokens"] for t in traces for s in t["steps"] if s.get("slm_completion_tokens"))
    return chars / tokens if tokens else 3.5


def step_cloud_tokens(s: dict[str, Any], cpt: float) -> tuple[int, int]:
    """(prompt, output) tokens of a traced step run on the cloud: its prompt, the cloud's traced answer."""
    return int(s["prompt_tokens"]), int(round(len(s["llm_text"]) / cpt))


def fit_cost_weight(traces: list[dict[str, Any]], gamma: float, prices: PriceSettings | None = None,
                    max_steps: int = 5) -> CostWeight:
    """The expected cloud output per step index, the average step and the costliest one, from
    (train) traces, at `prices` (the default ones unless given)."""
    prices = prices or PriceSettings()
    cpt = chars_per_token(traces)
    steps = [s for t in traces for s in t["steps"]]
    if not steps:
        raise UsageError("no traced steps to weigh cloud costs by: profile some tasks first (`hera profile`)")
    outs = [step_cloud_tokens(s, cpt)[1] for s in steps]
    by_index: dict[int, list[int]] = {}
    for s, o in zip(steps, outs):
        by_index.setdefault(min(s["step"], max_steps), []).append(o)
    out, last = [], 0.0
    for i in range(max(by_index) + 1):  # an index no task reached takes the one before it
        last = float(np.mean(by_index[i])) if i in by_index else last
        out.append(round(last, 2))
    weight = CostWeight(gamma, tuple(out), round(float(np.mean([s["prompt_tokens"] for s in steps])), 2),
                        round(float(np.mean(outs)), 2), max_ratio=1e9,
                        out_per_in=prices.cloud_output_per_input)
    costliest = max(weight.ratio(s["step"], s["prompt_tokens"]) for s in steps)
    return replace(weight, max_ratio=round(max(1.0, costliest), 3))


def cost_ratio(traces: list[dict[str, Any]], local: list[list[bool]], cpt: float,
               prices: PriceSettings | None = None) -> float:
    """Cloud cost of the steps a policy sends to the cloud over All-LLM's (traced prompts and answers)."""
    prices = prices or PriceSettings()
    total = spent = 0.0
    for t, flags in zip(traces, local):
        for s, f in zip(t["steps"], flags):
            c = prices.cloud_cost(*step_cloud_tokens(s, cpt))
            total += c
            spent += 0.0 if f else c
    return spent / total if total else 0.0


def calibrate_cost(traces: list[dict[str, Any]], predictor: Predictor, weight: CostWeight, *,
                   max_drop: float = 0.03, budget: float | None = None, prices: PriceSettings | None = None,
                   gammas: tuple[float, ...] = COST_GAMMAS) -> tuple[Kappa, PolicyEstimate, dict[str, Any]]:
    """Choose kappa's base and the cost weight's gamma together (one trade-off for every step):
    without a `budget`, the least estimated cloud cost whose accuracy stays within `max_drop` of
    All-LLM; with one (a share of All-LLM's cloud cost), the best estimated accuracy within it.
    gamma = 0 (kappa alone) is among the candidates, so the result is never worse on `traces`."""
    probs = step_probs(predictor, traces)
    cpt = chars_per_token(traces)
    per_step, max_steps = predictor.kappa.per_step, predictor.kappa.max_steps
    candidates = []
    for gamma in gammas:
        for base in list(np.round(np.arange(0.05, 1.0001, 0.01), 2)) + [1.01]:  # 1.01: all cloud
            kappa = Kappa(float(base), per_step, max_steps, replace(weight, gamma=float(gamma)))
            local = kappa_routes(traces, probs, kappa)
            est = estimate_routes(traces, local, kappa.base)
            candidates.append((kappa, est, cost_ratio(traces, local, cpt, prices)))
    llm = candidates[0][1].llm_accuracy
    if budget is None:
        # base 1.01 (all cloud: All-LLM's accuracy, cost 1) is always feasible unless max_drop < 0
        feasible = [c for c in candidates if c[1].accuracy >= llm - max_drop] or \
            [c for c in candidates if c[0].base > 1.0]
        key = lambda c: (c[2], -c[1].accuracy)  # noqa: E731 - cheapest, then most accurate
    else:
        feasible = [c for c in candidates if c[2] <= budget + 1e-9]
        if not feasible:
            raise UsageError(f"no threshold keeps the estimated cloud cost within {budget:g} of All-LLM's on the "
                             f"calibration tasks (the least is {min(c[2] for c in candidates):.3f}); "
                             "raise --cloud-budget")
        key = lambda c: (-c[1].accuracy, c[2])  # noqa: E731 - most accurate, then cheapest
    kappa, est, cost = min(feasible, key=key)
    alone = min((c for c in feasible if c[0].cost.gamma == 0.0), key=key)

    def point(c):
        return {"kappa_base": c[0].base, "gamma": c[0].cost.gamma, "est_accuracy": round(c[1].accuracy, 4),
                "est_local_share": round(c[1].local_share, 4), "est_cost_ratio": round(c[2], 4)}

    report = {"tasks": len(traces), "objective": "max accuracy within budget" if budget is not None else
              "min cloud cost within max_drop", "budget": budget, "max_drop": max_drop, "llm_accuracy": llm,
              "chars_per_token": round(cpt, 3), "chosen": point((kappa, est, cost)), "kappa_alone": point(alone)}
    return kappa, est, report


@dataclass
class FirstStepVote:
    """A task's first step as the SLM's samples voted on it (bench/eval/agreement_probe.py)."""

    passed: bool  # the greedy draft's device-side checks
    draft_key: str  # what the draft's answer amounts to (vote_key)
    keys: list[str]  # the samples' answers, in the order they were drawn


VOTE_MIN_SHARES = (0.5, 0.75, 1.0)


def vote_routes(traces: list[dict[str, Any]], probs: list[np.ndarray], votes: dict[str, FirstStepVote],
                kappa: Kappa, min_share: float) -> list[list[bool]]:
    """Local flags with a vote stage on the first step: kept when its draft passes its checks and
    enough samples agree (staged, as the runtime draws them), or for a free-text answer when the
    prefill clears kappa; later steps by kappa."""
    def first(v: FirstStepVote, p: float, s: dict[str, Any]) -> bool:
        if not v.passed:
            return False
        if not votable(v.draft_key):
            return bool(p >= threshold(kappa, s))
        return staged_agreement(v.draft_key, v.keys).share >= min_share

    out = []
    for t, p in zip(traces, probs):
        v = votes.get(t["task_id"])
        out.append([first(v, pk, s) if s["step"] == 0 and v is not None else bool(pk >= threshold(kappa, s))
                    for s, pk in zip(t["steps"], p)])
    return out


def calibrate_votes(traces: list[dict[str, Any]], predictor: Predictor, votes: dict[str, FirstStepVote],
                    max_drop: float = 0.03) -> tuple[VoteStage | None, Kappa, dict[str, Any]]:
    """Choose the vote stage's agreement share and the later steps' kappa together on the voted
    validation tasks: the most steps local whose estimated accuracy stays within `max_drop` of
    All-LLM. None when voting keeps no more steps local than the first stage alone."""
    calib = [t for t in traces if t["split"] == "val" and t["task_id"] in votes]
    if not calib:
        raise UsageError("no validation task has votes: sample its first steps with bench/eval/agreement_probe.py")
    probs = step_probs(predictor, calib)
    # The bar to clear: kappa alone, scanned on the same tasks (so a re-tuned kappa is not taken for the votes' gain)
    alone_kappa, alone = calibrate(calib, predictor, max_drop)
    best = None
    for share in VOTE_MIN_SHARES:
        for base in np.round(np.arange(0.05, 1.0001, 0.01), 2):
            kappa = replace(predictor.kappa, base=float(base))
            est = estimate_routes(calib, vote_routes(calib, probs, votes, kappa, share), kappa.base)
            if est.accuracy >= est.llm_accuracy - max_drop and (best is None or est.local_share > best[2].local_share + 1e-9):
                best = (share, kappa, est)
    k = max(len(votes[t["task_id"]].keys) for t in calib)
    report = {"tasks": len(calib), "k": k, "max_drop": max_drop, "llm_accuracy": alone.llm_accuracy,
              "first_stage_alone": {"kappa_base": alone_kappa.base, "est_accuracy": alone.accuracy,
                                    "est_local_share": alone.local_share}}
    if best is None or best[2].local_share <= alone.local_share + 1e-9:
        return None, predictor.kappa, {**report, "chosen": None}
    share, kappa, est = best
    report["chosen"] = {"min_share": share, "kappa_base": kappa.base, "est_accuracy": est.accuracy,
                        "est_local_share": est.local_share}
    return VoteStage(steps=1, k=k, min_share=share, meta=report), kappa, report


@dataclass(frozen=True)
class CostTarget:
    """Cost-aware calibration: each step's threshold weighed by its expected cloud cost too (one
    trade-off across a task's steps), calibrated for the least cloud cost within max_drop, or with
    `budget` (a share of All-LLM's cloud cost) for the best accuracy within that budget, at `prices`
    (the default ones unless given; the weight keeps their ratio)."""

    budget: float | None = None
    prices: PriceSettings | None = None


def _fit_booster(X: np.ndarray, y: np.ndarray, num_rounds: int, dask_client=None):
    """XGBoost on the rows, in process or on a Dask cluster."""
    import xgboost as xgb

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
    return booster


def train(traces: list[dict[str, Any]], *, max_drop: float = 0.03, num_rounds: int = 100, dask_client=None,
          openings: dict[str, str] | None = None, votes: dict[str, FirstStepVote] | None = None,
          cost: CostTarget | None = None,
          workloads: dict[str, WorkloadSpec] | None = None) -> tuple[Predictor, dict[str, Any]]:
    """Fit the predictor on the train split, calibrate kappa on val; with draft features in the
    traces, the draft stage too; with `openings` (task id -> the task's opening user message),
    the familiarity check that tells the runtime when a step is unlike every training task; with
    `votes` (task id -> its first step's vote), the vote stage and kappa calibrated together; with
    `cost`, kappa cost-aware (`CostTarget`); with `workloads` (name -> its spec, each traced family
    in exactly one), one operating point per workload besides the pooled one
    (`calibrate_workloads`: it needs `openings` of every family). The draft and vote stages are
    calibrated for the most steps local within `max_drop`, so a cloud budget is not combined with them."""
    cloud_budget = cost.budget if cost is not None else None
    if cloud_budget is not None and not 0.0 < cloud_budget <= 1.0:
        raise UsageError(f"the cloud budget is a share of All-LLM's cloud cost, in (0, 1]; got {cloud_budget}")
    groups = workload_families(traces, workloads) if workloads else None
    if groups and votes:
        raise UsageError("a vote stage is calibrated for one operating point, not per workload: drop --votes or "
                         "--workload")
    if cloud_budget is not None and votes:
        raise UsageError("a cloud budget and a vote stage cannot be calibrated together yet (the vote stage keeps "
                         "the most steps local within --max-drop): drop --votes or --cloud-budget")
    X, y = rows(traces, {"train"})
    Xv, yv = rows(traces, {"val"})
    if len(y) == 0:
        raise UsageError("no training rows: profile some tasks of the train split first (`hera profile`)")
    booster = _fit_booster(X, y, num_rounds, dask_client)
    predictor = Predictor(model_json=bytes(booster.save_raw("json")))
    calib = [t for t in traces if t["split"] == "val"] or [t for t in traces if t["split"] == "train"]
    cost_report = None
    if cost is not None:
        weight = fit_cost_weight([t for t in traces if t["split"] == "train"], gamma=0.0, prices=cost.prices)
        predictor.kappa, est, cost_report = calibrate_cost(calib, predictor, weight, max_drop=max_drop,
                                                           budget=cloud_budget, prices=cost.prices)
    else:
        predictor.kappa, est = calibrate(calib, predictor, max_drop)
    kappa = predictor.kappa
    gain = booster.get_score(importance_type="gain")
    importance = {FEATURE_NAMES[int(k[1:])] if k.startswith("f") else k: round(v, 4) for k, v in gain.items()}
    report = {
        "train_rows": int(len(y)), "val_rows": int(len(yv)), "train_positive_rate": float(y.mean()),
        "auc_train": auc(y, predictor.predict(X)),
        "auc_val": auc(yv, predictor.predict(Xv)) if len(yv) else float("nan"),
        "kappa": kappa.to_dict(),
        **({"cost_calibration": cost_report} if cost_report is not None else {}),
        "calibration": {"split": "val" if calib and calib[0]["split"] == "val" else "train",
                        "max_drop": max_drop, "est_accuracy": est.accuracy, "llm_accuracy": est.llm_accuracy,
                        "est_local_share": est.local_share},
        "feature_importance_gain": dict(sorted(importance.items(), key=lambda kv: -kv[1])),
    }
    predictor.meta = dict(report)
    drafted = has_drafts([t for t in traces if t["split"] == "train"])
    if drafted and cloud_budget is not None:
        report["draft_stage"] = "not calibrated: a draft stage keeps the most steps local within --max-drop, " \
                                "not within a cloud budget"
    elif drafted:
        predictor.draft, report["draft_stage"] = train_draft_stage(traces, predictor, max_drop=max_drop)
    if openings:
        predictor.familiarity = fit_familiarity(
            [(t["family"], openings[t["task_id"]]) for t in traces if t["split"] == "train" and t["task_id"] in openings],
            [(t["family"], openings[t["task_id"]]) for t in traces if t["split"] == "val" and t["task_id"] in openings],
            tools=family_tools(traces))
        report["familiarity"] = {**predictor.familiarity.meta, "thresholds": dict(zip(
            predictor.familiarity.families, (round(float(x), 4) for x in predictor.familiarity.thresholds)))}
    if votes:
        predictor.vote, predictor.kappa, report["vote_stage"] = calibrate_votes(traces, predictor, votes, max_drop)
        if cost_report is not None:  # the vote stage re-chose kappa's base (gamma stays)
            cost_report["kappa_base_with_vote_stage"] = predictor.kappa.base
        report["kappa"] = predictor.kappa.to_dict()  # with the votes
        predictor.meta.update(vote_stage=report["vote_stage"], kappa=report["kappa"])
    if groups:
        predictor.workloads, report["workloads"] = calibrate_workloads(traces, predictor, groups,
                                                                       max_drop=max_drop, cost=cost)
        predictor.meta["workloads"] = report["workloads"]
    return predictor, report


def family_tools(traces: list[dict[str, Any]]) -> dict[str, bool]:
    """Family -> whether its tasks offer tools (most of its tasks' first steps do)."""
    column = FEATURE_NAMES.index("tools_offered")
    votes: dict[str, list[bool]] = {}
    for t in traces:
        if t["steps"]:
            votes.setdefault(t["family"], []).append(t["steps"][0]["features"][column] > 0)
    return {f: sum(v) * 2 > len(v) for f, v in votes.items()}


@dataclass(frozen=True)
class WorkloadSpec:
    """A workload of `hera train --workload NAME=FAMILY,...[:OPTION,...]`: the traced families it
    holds (fnmatch patterns: `bfcl_*`) and how its operating point is calibrated."""

    patterns: tuple[str, ...]
    draft: bool = True  # its own draft stage where its traces have drafts (option "no-draft": never drafted)
    kappa_alone: bool = False  # kappa without a cost weight even with --cost-aware (option "kappa-alone")
    families: tuple[str, ...] = ()  # the traced families the patterns match (`workload_families`)


WORKLOAD_OPTIONS = {"no-draft": {"draft": False}, "kappa-alone": {"kappa_alone": True}}


def workload_families(traces: list[dict[str, Any]], specs: dict[str, WorkloadSpec]) -> dict[str, WorkloadSpec]:
    """The specs with the traced families their patterns match. Every traced family must match
    exactly one workload, and every workload some family: else a UsageError."""
    from fnmatch import fnmatchcase

    families = sorted({t["family"] for t in traces})
    out = {name: replace(spec, families=tuple(f for f in families if any(fnmatchcase(f, p) for p in spec.patterns)))
           for name, spec in specs.items()}
    empty = [name for name, spec in out.items() if not spec.families]
    if empty:
        raise UsageError(f"--workload {empty[0]}={','.join(specs[empty[0]].patterns)} matches none of the traced "
                         f"families {families}")
    for f in families:
        owners = [name for name, spec in out.items() if f in spec.families]
        if len(owners) != 1:
            raise UsageError(f"traced family {f!r} is in {'no' if not owners else 'more than one'} workload "
                             f"({', '.join(owners) or 'none matches it'}): give each family exactly one --workload")
    return out


def calibrate_workloads(traces: list[dict[str, Any]], predictor: Predictor, specs: dict[str, WorkloadSpec], *,
                        max_drop: float = 0.03, cost: CostTarget | None = None) -> tuple[tuple[Workload, ...], dict]:
    """One operating point per workload for the predictor's shared model: kappa (with its cost weight
    fitted on the workload's train split, with `cost` unless the spec says kappa alone), calibrated
    on the workload's validation split as `train` calibrates a predictor of its own, and the
    workload's own draft stage, fitted on its train split's drafts (where it has them and the spec
    drafts). The familiarity check must know every family (it chooses the point at run time)."""
    fam = predictor.familiarity
    missing = sorted(set(f for spec in specs.values() for f in spec.families) - set(fam.families if fam else ()))
    if missing:
        raise UsageError(f"per-workload operating points are chosen by the familiarity check, which has no tasks of "
                         f"{missing}: give their traces an opening (profile them again) or --tasks-file")
    out, report = [], {}
    for name, spec in specs.items():
        own = [t for t in traces if t["family"] in spec.families]
        calib = [t for t in own if t["split"] == "val"] or [t for t in own if t["split"] == "train"]
        train_split = [t for t in own if t["split"] == "train"] or own
        cost_report = None
        if cost is not None and not spec.kappa_alone:
            weight = fit_cost_weight(train_split, gamma=0.0, prices=cost.prices)
            kappa, est, cost_report = calibrate_cost(calib, predictor, weight, max_drop=max_drop, budget=cost.budget,
                                                     prices=cost.prices)
        else:
            kappa, est = calibrate(calib, predictor, max_drop, weighed=False)
        probs = step_probs(predictor, calib)
        local = kappa_routes(calib, probs, kappa)
        draft, draft_report = None, None
        if spec.draft and has_drafts(train_split) and (cost is None or cost.budget is None):
            draft, draft_report = train_draft_stage(own, predictor, max_drop=max_drop, kappa=kappa)
            if draft.band > 0:
                p2 = [draft.predict(np.asarray([s["features"] + s["draft_features"] for s in t["steps"]],
                                               dtype=np.float32)) for t in calib]
                local = two_stage_routes(calib, probs, p2, kappa, draft.band, draft.keep_threshold)
                est = estimate_routes(calib, local, kappa.base)
            else:  # drafting keeps no more steps local here: not drafted
                draft, draft_report = None, f"off: it keeps no more steps local (val AUC {draft_report['auc_val']:.3f})"
        yv = np.asarray([s["label"] for t in calib for s in t["steps"]], dtype=np.float32)
        meta = {"families": list(spec.families), "calibration_tasks": len(calib),
                "calibration_split": calib[0]["split"], "auc": auc(yv, np.concatenate(probs)), "max_drop": max_drop,
                "est_accuracy": round(est.accuracy, 4), "llm_accuracy": round(est.llm_accuracy, 4),
                "est_local_share": round(est.local_share, 4),
                **({"est_cost_ratio": round(cost_ratio(calib, local, chars_per_token(calib), cost and cost.prices), 4)}
                   if all("prompt_tokens" in s and "llm_text" in s for t in calib for s in t["steps"]) else {}),
                "draft_stage": draft_report if draft_report is not None else
                ("off: the workload is not drafted" if not spec.draft else
                 "off: not calibrated within a cloud budget" if cost is not None and cost.budget is not None else
                 "off: no drafts in its traces"),
                **({"cost_calibration": cost_report} if cost_report is not None else {})}
        out.append(Workload(name, spec.families, kappa, draft, meta))
        report[name] = {**meta, "kappa": kappa.to_dict()}
    return tuple(out), report


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


# --- the second stage: keep the SLM's draft, or escalate ------------------------------------------
DRAFT_BANDS = (0.0, 0.1, 0.2, 0.3, 0.5, 1.0)  # candidate widths of the uncertain band; 0: no drafting


def has_drafts(traces: list[dict[str, Any]]) -> bool:
    return bool(traces) and all("draft_features" in s for t in traces for s in t["steps"])


def draft_rows(traces: list[dict[str, Any]], splits: set[str]) -> tuple[np.ndarray, np.ndarray]:
    steps = [s for t in traces if t["split"] in splits for s in t["steps"]]
    X = [s["features"] + s["draft_features"] for s in steps]
    return (np.asarray(X, dtype=np.float32).reshape(-1, len(DRAFT_STAGE_FEATURE_NAMES)),
            np.asarray([s["label"] for s in steps], dtype=np.float32))


def two_stage_routes(traces, p1: list[np.ndarray], p2: list[np.ndarray], kappa: Kappa, band: float,
                     keep: float) -> list[list[bool]]:
    """Local flags of the two-stage policy: sure (P1 >= kappa + band) local; uncertain
    (|P1 - kappa| < band) local when the draft stage says keep; the rest cloud."""
    out = []
    for t, a, b in zip(traces, p1, p2):
        flags = []
        for s, pa, pb in zip(t["steps"], a, b):
            k = threshold(kappa, s)
            flags.append(bool(pa >= k + band or (abs(pa - k) < band and pb >= keep)))
        out.append(flags)
    return out


def calibrate_draft_stage(calib: list[dict[str, Any]], first: Predictor, kappa: Kappa, stage: DraftStage,
                          max_drop: float) -> tuple[float, float, PolicyEstimate]:
    """(band, keep threshold, estimate) of the draft stage on `calib` with the first stage's
    `kappa`: the most steps local whose estimated accuracy stays within `max_drop` of All-LLM;
    (0, 1.01, the first stage's estimate) when drafting keeps no more steps local."""
    p1 = step_probs(first, calib)
    p2 = [stage.predict(np.asarray([s["features"] + s["draft_features"] for s in t["steps"]], dtype=np.float32))
          for t in calib]
    best = None
    for band in DRAFT_BANDS:  # ascending: a wider band (more drafting) must keep strictly more steps local
        for keep in np.round(np.arange(0.05, 1.0001, 0.01), 2):
            est = estimate_routes(calib, two_stage_routes(calib, p1, p2, kappa, band, float(keep)), kappa.base)
            if est.accuracy >= est.llm_accuracy - max_drop and (best is None or est.local_share > best[2].local_share + 1e-9):
                best = (band, float(keep), est)
    if best is None:  # nothing meets the target: draft nothing
        best = (0.0, 1.01, estimate(calib, p1, kappa))
    if best[0] == 0.0:
        best = (0.0, 1.01, best[2])  # the first stage alone is best: the stage stays off
    return best


def train_draft_stage(traces: list[dict[str, Any]], first: Predictor, *, max_drop: float = 0.03,
                      num_rounds: int = 100, kappa: Kappa | None = None) -> tuple[DraftStage, dict[str, Any]]:
    """Fit the draft stage on the train split's drafts (prefill + draft features, the same
    substitution labels) and calibrate its band and keep threshold on the validation split:
    the most steps local whose estimated accuracy stays within `max_drop` of All-LLM, with the
    first stage's `kappa` (default: the predictor's)."""
    import xgboost as xgb

    X, y = draft_rows(traces, {"train"})
    if len(y) == 0:
        raise UsageError("no draft features in the train split: run `hera profile` (it records them)")
    booster = xgb.train(XGB_PARAMS, xgb.DMatrix(X, label=y), num_boost_round=num_rounds)
    stage = DraftStage(model_json=bytes(booster.save_raw("json")))
    calib = [t for t in traces if t["split"] == "val"] or [t for t in traces if t["split"] == "train"]
    best = calibrate_draft_stage(calib, first, kappa or first.kappa, stage, max_drop)
    stage.band, stage.keep_threshold = best[0], best[1]
    Xv, yv = draft_rows(traces, {"val"})
    gain = booster.get_score(importance_type="gain")
    report = {"train_rows": int(len(y)), "auc_train": auc(y, stage.predict(X)),
              "auc_val": auc(yv, stage.predict(Xv)) if len(yv) else float("nan"),
              "band": stage.band, "keep_threshold": stage.keep_threshold,
              "calibration": {"est_accuracy": best[2].accuracy, "llm_accuracy": best[2].llm_accuracy,
                              "est_local_share": best[2].local_share, "max_drop": max_drop},
              "feature_importance_gain": dict(sorted(
                  ((DRAFT_STAGE_FEATURE_NAMES[int(k[1:])], round(v, 4)) for k, v in gain.items()), key=lambda kv: -kv[1]))}
    stage.meta = report
    return stage, report
