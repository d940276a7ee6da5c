"""`hera demo`: agent tasks routed by HERA against the same tasks all-cloud, read from the ledger."""

from __future__ import annotations

import math
import time
from typing import Any

from hera_core.config import HeraSettings
from hera_core.progress import progress_bar
from hera_core.offline.harness import run_task
from hera_core.routing.policy import Override
from hera_core.serving.assembly import open_ledger, open_runtime
from hera_core.offline.workloads import REASONING_GYM, make_tasks


async def run_demo(settings: HeraSettings, n_tasks: int = 16, *, seed: int = 0, progress: bool = True,
                   use_cache: bool = True) -> dict[str, Any]:
    families = list(REASONING_GYM)  # the quick families: HumanEval and MMLU are in `hera eval`
    tasks = make_tasks(families, per_family=math.ceil(n_tasks / len(families)), seed=seed, split="test")[:n_tasks]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    runs = {"hera": f"demo-{stamp}-hera", "all_cloud": f"demo-{stamp}-all-cloud"}
    correct = {"hera": 0.0, "all_cloud": 0.0}
    async with open_runtime(settings, run=runs["hera"], use_cache=use_cache) as rt:
        with progress_bar("demo", 2 * len(tasks), enabled=progress) as bar:
            for arm, override in (("all_cloud", Override.CLOUD_ONLY), ("hera", Override.AUTO)):
                bar.update(description=f"{arm.replace('_', '-')} runs")
                for task in tasks:
                    async def step(messages, step_no, task=task, arm=arm, override=override):
                        r = await rt.complete(messages, session=f"{runs[arm]}:{task.task_id}", step=step_no,
                                              override=override, run=runs[arm])
                        return r.text, r.route.value
                    traj = await run_task(task, step)
                    correct[arm] += traj.correct
                    bar.advance()
    ledger = open_ledger(settings)
    try:
        hera, cloud = ledger.totals(runs["hera"]), ledger.totals(runs["all_cloud"])
    finally:
        ledger.close()
    n = max(1, len(tasks))
    return {
        "tasks": len(tasks), "families": sorted({t.family for t in tasks}),
        "accuracy": correct["hera"] / n, "all_cloud_accuracy": correct["all_cloud"] / n,
        "subtasks": hera["subtasks"], "local_subtasks": hera["local_subtasks"], "local_share": hera["local_share"],
        "cloud_cost_usd": hera["cloud_cost_usd"], "cost_usd": hera["cost_usd"],
        "all_cloud_cost_usd": cloud["cost_usd"],
        "saving_vs_all_cloud": 1 - hera["cost_usd"] / cloud["cost_usd"] if cloud["cost_usd"] else 0.0,
        "runs": runs, "ledger": str(settings.resolved_ledger_path()),
        "prices": f"cloud at {settings.prices.cloud_price_model} prices of {settings.prices.cloud_price_date}",
        "models": {"local": settings.local.model, "cloud": settings.cloud.model},
    }


def render(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"HERA demo: {result['tasks']} agent tasks ({', '.join(result['families'])})")
    for col in ("", "accuracy", "subtasks local", "cloud cost", "total cost", "saving vs all-cloud"):
        t.add_column(col, justify="right")
    t.add_row("all-cloud", f"{result['all_cloud_accuracy']:.0%}", "0%", f"${result['all_cloud_cost_usd']:.6f}",
              f"${result['all_cloud_cost_usd']:.6f}", "-")
    t.add_row("HERA", f"{result['accuracy']:.0%}",
              f"{result['local_share']:.0%} ({result['local_subtasks']}/{result['subtasks']})",
              f"${result['cloud_cost_usd']:.6f}", f"${result['cost_usd']:.6f}", f"{result['saving_vs_all_cloud']:.0%}")
    console = Console()
    console.print(t)
    console.print(f"local {result['models']['local']}, cloud {result['models']['cloud']}; {result['prices']}; "
                  f"ledger {result['ledger']} (runs {result['runs']['hera']}, {result['runs']['all_cloud']})")
