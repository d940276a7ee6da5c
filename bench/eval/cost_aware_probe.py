"""One cloud budget across a task's steps, label-based: the accuracy-vs-cloud-cost curve of the
shipped predictor's kappa(step) alone (gamma = 0) against the same threshold weighed by each
step's expected cloud cost (gamma > 0, `hera train --cost-aware`), on the committed val and test
traces. A task stays correct when every local step has a positive substitution label (with one
step local: the outcome profiled for exactly that); costs are the traced prompts and the cloud's
traced answers at the default prices; the expected outputs per step index come from the train
split. The live, end-to-end figures are `hera eval --offline` (the shipped predictor is cost-weighted)
and docs/cost-budget.md.

    .venv/bin/python bench/eval/cost_aware_probe.py   # writes bench/eval/cost_aware.json
"""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from hera_core.offline.profiling import load_traces
from hera_core.offline.training import (COST_GAMMAS, chars_per_token, cost_ratio, estimate_routes, fit_cost_weight,
                                        kappa_routes, step_probs)
from hera_core.routing.predictor import Predictor

HERE = Path(__file__).parent
COSTS = (0.2, 0.3, 0.4, 0.45, 0.5, 0.55, 0.6, 0.7)  # where the curves are read off


def main() -> None:
    predictor = Predictor.load()
    traces = {s: load_traces(HERE / f"traces-{s}.jsonl") for s in ("train", "val", "test")}
    weight = fit_cost_weight(traces["train"], 0.0)
    out = {"cost_weight": weight.to_dict(), "accuracy_at_cost": {}}
    for split in ("val", "test"):
        T, cpt = traces[split], chars_per_token(traces[split])
        P = step_probs(predictor, T)
        out["accuracy_at_cost"][split] = {}
        for gamma in COST_GAMMAS:
            points = []
            for base in np.round(np.arange(0.3, 1.0201, 0.01), 2):
                kappa = replace(predictor.kappa, base=float(base), cost=replace(weight, gamma=gamma))
                local = kappa_routes(T, P, kappa)
                points.append((cost_ratio(T, local, cpt), estimate_routes(T, local, kappa.base).accuracy))
            points.sort()
            c, a = np.array([p[0] for p in points]), np.array([p[1] for p in points])
            # the best accuracy at or below each cost (a curve read as a budget)
            out["accuracy_at_cost"][split][str(gamma)] = {str(x): round(float(a[c <= x + 1e-9].max()), 4)
                                                          if (c <= x + 1e-9).any() else None for x in COSTS}
    (HERE / "cost_aware.json").write_text(json.dumps(out, indent=1))
    for split, curves in out["accuracy_at_cost"].items():
        print(split, "cost:", COSTS)
        for gamma, row in curves.items():
            print(f"  gamma {gamma}:", list(row.values()))


if __name__ == "__main__":
    main()
