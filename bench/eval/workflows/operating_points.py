"""HERA's operating points on the workflow test tasks: the predictor of each `hera train --cost-aware
--max-drop D` (predictor.json is D = 0.03, predictor-drop06/08/10.json the others), HERA run on all
89 test tasks with the query router at most its cloud cost and All-LLM beside it, paired intervals;
prints the table of docs/workloads.md and draws the points over report.json's methods (eval.png).

    .venv/bin/python bench/eval/workflows/operating_points.py            # table + eval.png
    .venv/bin/python bench/eval/workflows/operating_points.py --measure  # runs them (live where the
        cache misses; --cache: the evaluation's completion cache), writes operating-points.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

from hera_core.offline.report import plot

HERE = Path(__file__).resolve().parent
PREDICTORS = {0.03: "predictor.json", 0.06: "predictor-drop06.json", 0.08: "predictor-drop08.json",
              0.10: "predictor-drop10.json"}
POINTS = HERE / "operating-points.json"
KEYS = ("accuracy", "local_share", "cost_ratio")


async def measure(cache_path: Path) -> dict:
    from hera_core.backends.caching import CachingEngine, CompletionCache
    from hera_core.config import load_settings
    from hera_core.offline.evaluation import (AllLLM, Evaluator, Hera, first_step_scores, router_at_cost,
                                              summarize)
    from hera_core.offline.stats import paired_bootstrap
    from hera_core.offline.workloads import make_tasks
    from hera_core.routing.predictor import Predictor
    from hera_core.serving.assembly import open_engines

    settings = load_settings(HERE / "eval.toml")
    tasks = make_tasks(["workflow_quote"], per_family=89, split="test")
    out = {}
    cache = CompletionCache(cache_path)
    try:
        async with open_engines(settings) as (local, cloud):
            for drop, name in PREDICTORS.items():
                ev = Evaluator(CachingEngine(local, cache), CachingEngine(cloud, cache),
                               Predictor.load(HERE / name), cache, settings.prices, settings.local.model)
                llm, hera = await ev.run(AllLLM(), tasks), await ev.run(Hera(), tasks)
                llm_cost = sum(s.cloud_cost_usd for r in llm for s in r.steps)
                router = await router_at_cost(ev, tasks, await first_step_scores(ev, tasks), llm, hera)
                right = {k: [r.correct for r in v] for k, v in (("hera", hera), ("router", router), ("llm", llm))}
                out[str(drop)] = {"predictor": name, "hera": summarize(hera, llm_cost),
                                  "query_router_cost": summarize(router, llm_cost), "all_llm": summarize(llm, llm_cost),
                                  "hera_minus_router": paired_bootstrap(right["hera"], right["router"]),
                                  "hera_minus_all_llm": paired_bootstrap(right["hera"], right["llm"])}
                print(f"max-drop {drop}: measured", flush=True)
    finally:
        cache.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--measure", action="store_true")
    ap.add_argument("--cache", default=str(HERE / "cache-eval" / "completions.sqlite"))
    args = ap.parse_args()
    if args.measure:
        POINTS.write_text(json.dumps(asyncio.run(measure(Path(args.cache))), indent=1))
    points = []
    for drop, p in json.loads(POINTS.read_text()).items():
        hera, router = p["hera"], p["query_router_cost"]
        d, dl = p["hera_minus_router"], p["hera_minus_all_llm"]
        print(f"max-drop {float(drop):.2f}: HERA {hera['accuracy']:.1%} at {hera['local_share']:.1%} local, cost "
              f"{hera['cost_ratio']:.2f}; router at its cost {router['accuracy']:.1%} at "
              f"{router['cost_ratio']:.2f}; HERA - router {100 * d['diff']:+.1f} ({100 * d['ci95'][0]:+.1f} to "
              f"{100 * d['ci95'][1]:+.1f}); HERA - All-LLM {100 * dl['diff']:+.1f} ({100 * dl['ci95'][0]:+.1f} to "
              f"{100 * dl['ci95'][1]:+.1f})")
        points.append({"threshold_offset": float(drop), **{k: hera[k] for k in KEYS},
                       "query_router": {k: router[k] for k in KEYS}})
    base = json.loads((HERE / "report.json").read_text())
    plot({**base, "sweep": points}, str(HERE / "eval.png"),
         sweep_label="HERA, max-drop 0.03 / 0.06 / 0.08 / 0.10 (live)",
         router_label="query router calibrated to each point's cloud cost (live)")
    print(f"plot: {HERE / 'eval.png'}")


if __name__ == "__main__":
    main()
