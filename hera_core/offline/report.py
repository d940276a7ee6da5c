"""What `hera eval` shows: the estimated trade-off curve, the accuracy/cost plot (PNG) and the
report's tables (rich)."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np

from hera_core.offline.evaluation import METHOD_NAMES
from hera_core.routing.predictor import Predictor


def estimated_curve(traces: list[dict[str, Any]], predictor: Predictor) -> list[dict[str, float]]:
    """HERA's cost/accuracy trade-off as the threshold sweeps, estimated from profiled labels (with
    the kappa of the workload that holds every traced family, for a predictor shared by workloads)."""
    from hera_core.offline.training import estimate, step_probs

    families = {t["family"] for t in traces}
    kappa = next((w.kappa for w in predictor.workloads if families <= set(w.families)), predictor.kappa)
    probs = step_probs(predictor, traces)
    points = []
    for base in np.round(np.arange(0.0, 1.0201, 0.02), 2):
        est = estimate(traces, probs, replace(kappa, base=float(base)))
        points.append({"threshold_base": float(base), "accuracy": est.accuracy, "local_share": est.local_share})
    return points


def plot(report: dict[str, Any], path: str, sweep_label: str = "HERA, threshold sweep (live)",
         router_label: str = "query router at each sweep point's local share (live)") -> None:
    """Accuracy against cloud cost (relative to All-LLM): the methods, and HERA's live threshold sweep
    (or other HERA operating points in `report["sweep"]`, named by `sweep_label`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5), dpi=120)  # the legend takes the right third
    sweep = sorted(report.get("sweep") or [], key=lambda p: p["cost_ratio"])
    if sweep:
        ax.plot([p["cost_ratio"] for p in sweep], [p["accuracy"] for p in sweep], "-o", color="tab:green", alpha=0.5,
                markersize=3, label=sweep_label)
    routed = sorted((p["query_router"] for p in sweep if "query_router" in p), key=lambda q: q["cost_ratio"])
    if routed:
        ax.plot([q["cost_ratio"] for q in routed], [q["accuracy"] for q in routed], "--^", color="tab:orange",
                alpha=0.5, markersize=3, label=router_label)
    marks = {"all_slm": "s", "all_llm": "D", "random": "x", "query_router": "^", "query_router_cost": "v",
             "query_cascade": "P", "hera_prefill": "h", "hera": "o", "oracle": "*"}
    for name, m in report["methods"].items():
        est = " est." if m.get("estimated") else ""
        ax.plot([m["cost_ratio"]], [m["accuracy"]], marks.get(name, "."), markersize=10,
                label=f"{name}{est} ({m['accuracy']:.0%} acc., {m['local_share']:.0%} local)")
    ax.set_xlabel("cloud cost relative to All-LLM")
    ax.set_ylabel("task accuracy")
    ax.set_title(f"Accuracy vs cloud cost ({report['methods']['all_llm']['tasks']} test tasks)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the plot: it hides no point
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def render_report(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()

    def table(title: str, methods: dict[str, Any]) -> Table:
        t = Table(title=title)
        for col in ("method", "tasks", "accuracy (95% CI)", "local share", "cloud cost vs All-LLM", "latency/task",
                    "escalated (latency/step)"):
            t.add_column(col, justify="right")
        for name in METHOD_NAMES:
            m = methods.get(name)
            if m is None:
                continue
            lo, hi = m["accuracy_ci95"]
            lat = "-" if math.isnan(m["mean_latency_s"]) else f"{m['mean_latency_s']:.1f}s"
            esc = "-" if not m.get("escalated_share") else \
                f"{m['escalated_share']:.1%} ({m['escalated_latency_s']:.1f}s)"
            t.add_row(name + (" (est.)" if m.get("estimated") else ""), str(m["tasks"]),
                      f"{m['accuracy']:.1%} ({lo:.0%}-{hi:.0%})", f"{m['local_share']:.1%}", f"{m['cost_ratio']:.2f}", lat,
                      esc)
        return t

    console.print(table("Overall", report["methods"]))
    if report.get("hera_minus"):
        t = Table(title="HERA minus each method, same tasks (paired bootstrap 95% interval)")
        for col in ("method", "accuracy difference", "95% interval"):
            t.add_column(col, justify="right")
        for name in METHOD_NAMES:
            d = report["hera_minus"].get(name)
            if d is not None:
                t.add_row(name, f"{d['diff'] * 100:+.1f} pts", f"{d['ci95'][0] * 100:+.1f} to {d['ci95'][1] * 100:+.1f}")
        console.print(t)
    share = report["methods"].get("hera", {}).get("unfamiliar_share", 0.0)
    if share:
        console.print(f"[bold yellow]The predictor is out of its depth on {share:.0%} of the steps[/]: they are unlike "
                      "every task it was trained on (its familiarity check), so policy.unfamiliar decided them, not "
                      "the predictor. For a predictor that knows your tasks: `hera profile --tasks-file ...`, then "
                      "`hera train`.")
    for family, methods in report["families"].items():
        console.print(table(family, methods))
    console.print(report.get("prices", ""))
