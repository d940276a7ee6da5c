"""One cloud budget across a task's steps, estimated before building it in: does routing by
accuracy-per-dollar (cloud iff (1 - P) > lambda x the step's expected cloud cost, the Lagrangian
form of one budget over all steps, as in cascade routing) beat the position-aware kappa(step) at
equal cloud cost? Label-based estimate (a task stays correct when every local step has a positive
substitution label), the shipped predictor, the committed val and test traces; the expected output
tokens per step index come from the train traces (the SLM's completion lengths there).

    .venv/bin/python bench/eval/cost_aware_probe.py   # writes bench/eval/cost_aware.json
"""

import json
from pathlib import Path

import numpy as np

from hera_core.config import PriceSettings
from hera_core.offline.profiling import load_traces
from hera_core.offline.training import estimate_routes
from hera_core.routing.predictor import Predictor

HERE = Path(__file__).parent
OFFSETS = (-0.3, -0.15, -0.05, 0.0, 0.03, 0.06)
LAMBDAS = (0.0003, 0.0005, 0.0008, 0.001, 0.0013, 0.0016, 0.002, 0.004)  # per dollar per million steps


def main() -> None:
    predictor, prices = Predictor.load(), PriceSettings()
    traces = {s: load_traces(HERE / f"traces-{s}.jsonl") for s in ("train", "val", "test")}
    lengths: dict[int, list[int]] = {}
    for t in traces["train"]:
        for s in t["steps"]:
            lengths.setdefault(min(s["step"], 5), []).append(s["slm_completion_tokens"])
    expected_out = {k: float(np.mean(v)) for k, v in lengths.items()}

    def expected_cost(s):  # what the router can know before the step runs
        return prices.cloud_cost(s["prompt_tokens"], int(expected_out.get(min(s["step"], 5), 0)))

    def spent(s):  # the step's cloud cost as it ran (the LLM's output, ~3.5 characters a token)
        return prices.cloud_cost(s["prompt_tokens"], int(len(s["llm_text"]) / 3.5))

    out = {"expected_output_tokens": expected_out}
    for split in ("val", "test"):
        T = traces[split]
        P = [predictor.predict(np.asarray([s["features"] for s in t["steps"]], dtype=np.float32)) for t in T]
        total = sum(spent(s) for t in T for s in t["steps"])

        def point(rule):
            local = [[rule(s, p) for s, p in zip(t["steps"], pp)] for t, pp in zip(T, P)]
            est = estimate_routes(T, local, 0.0)
            cost = sum(spent(s) for t, fl in zip(T, local) for s, f in zip(t["steps"], fl) if not f)
            return {"accuracy": est.accuracy, "local_share": est.local_share, "cost_ratio": cost / total}

        out[split] = {
            "kappa": [{"offset": o, **point(lambda s, p, o=o: p >= predictor.kappa(s["step"]) + o)} for o in OFFSETS],
            "lambda": [{"lambda": lam, **point(lambda s, p, lam=lam: 1 - p <= lam * expected_cost(s) * 1e6)}
                       for lam in LAMBDAS]}
    (HERE / "cost_aware.json").write_text(json.dumps(out, indent=1))
    for split in ("val", "test"):
        for rule in ("kappa", "lambda"):
            print(split, rule, [(round(q["cost_ratio"], 3), round(q["accuracy"], 3)) for q in out[split][rule]])


if __name__ == "__main__":
    main()
