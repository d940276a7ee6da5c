"""HERA's operating points on the workflow test tasks: one `hera eval` report per predictor
(`hera train --cost-aware --max-drop D`, D = 0.03 (report-40.json), 0.10, 0.20) on the first 40 test tasks, each with the
query router at most its cloud cost from the same run; prints the table of docs/workloads.md and
draws them over report-40.json's methods (eval.png).

    .venv/bin/python bench/eval/workflows/operating_points.py
"""

from __future__ import annotations

import json
from pathlib import Path

from hera_core.offline.report import plot

HERE = Path(__file__).resolve().parent
REPORTS = {0.03: "report-40.json", 0.10: "report-drop10.json", 0.20: "report-drop20.json"}
KEYS = ("accuracy", "local_share", "cost_ratio")


def main() -> None:
    points = []
    for drop, name in REPORTS.items():
        r = json.loads((HERE / name).read_text())
        hera, router, diff = r["methods"]["hera"], r["methods"]["query_router_cost"], r["hera_minus"]
        lo, hi = diff["query_router_cost"]["ci95"]
        llo, lhi = diff["all_llm"]["ci95"]
        print(f"max-drop {drop:.2f}: HERA {hera['accuracy']:.1%} at {hera['local_share']:.1%} local, cost "
              f"{hera['cost_ratio']:.2f}; router at most its cost {router['accuracy']:.1%} at {router['cost_ratio']:.2f}; "
              f"HERA - router {100 * diff['query_router_cost']['diff']:+.1f} ({100 * lo:+.1f} to {100 * hi:+.1f}); "
              f"HERA - All-LLM {100 * diff['all_llm']['diff']:+.1f} ({100 * llo:+.1f} to {100 * lhi:+.1f}); "
              f"stages local {', '.join(f'{k} {v:.0%}' for k, v in r['stages']['hera'].items())}")
        points.append({"threshold_offset": drop, **{k: hera[k] for k in KEYS},
                       "query_router": {k: router[k] for k in KEYS}})
    base = json.loads((HERE / REPORTS[0.03]).read_text())
    plot({**base, "sweep": points}, str(HERE / "eval.png"), sweep_label="HERA, max-drop 0.03 / 0.10 / 0.20 (live)",
         router_label="query router at most each point's cloud cost (live)")
    print(f"plot: {HERE / 'eval.png'}")


if __name__ == "__main__":
    main()
