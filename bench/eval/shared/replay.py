"""The shipped predictor (hera_core/data/default_predictor.json: one model for every workload, `hera
train --workload`, docs/shared-predictor.md) replayed on each workload's test tasks beside the
predictor that workload was evaluated with:
All-LLM, HERA with the workload's own predictor (its report's run, from the committed cache), HERA
with the shared one, and the query router at the shared HERA's cloud cost, with paired 95%
intervals. What the committed caches do not hold (routes the shared predictor takes that no earlier
run took) is generated live and added to this workload's cache, so a rerun is a replay.

    .venv/bin/python bench/eval/shared/replay.py --workload bfcl      # live where the cache misses
    .venv/bin/python bench/eval/shared/replay.py --workload all --offline   # the committed replay
    .venv/bin/python bench/eval/shared/replay.py                      # print replay.json's table
"""

from __future__ import annotations

import argparse
import asyncio
import json
import lzma
import shutil
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
EVAL = HERE.parent
RESULTS = HERE / "replay.json"
SHIPPED = HERE.parents[2] / "hera_core" / "data" / "default_predictor.json"
WORK = HERE / "cache"  # writable copies of the committed caches (ignored by git)


@dataclass(frozen=True)
class Workload:
    traces: str | None  # test traces whose task ids are the evaluated tasks (None: all test tasks)
    families: tuple[str, ...]
    per_family: int
    own_predictor: str  # the predictor the workload's report was made with
    cache: str  # its committed completion cache
    config: str | None = None  # its evaluation's settings file


WORKLOADS = {
    "reasoning": Workload("traces-test.jsonl", (), 80, "predictor.json", "completions.sqlite.xz"),
    "bfcl": Workload("tools/traces-test-eval.jsonl", (), 30, "tools/predictor.json", "tools/completions.sqlite.xz"),
    "workflows": Workload(None, ("workflow_quote",), 89, "workflows/predictor.json",
                          "workflows/completions.sqlite.xz", "workflows/eval.toml"),
}


def tasks_of(w: Workload):
    from hera_core.offline.profiling import load_traces
    from hera_core.offline.workloads import make_tasks

    if w.traces is None:
        return make_tasks(list(w.families), per_family=w.per_family, split="test")
    traces = load_traces(EVAL / w.traces)
    ids = {t["task_id"] for t in traces}
    tasks = make_tasks(sorted({t["family"] for t in traces}), per_family=w.per_family, split="test")
    return [t for t in tasks if t.task_id in ids]


def cache_copy(name: str, w: Workload, offline: bool) -> Path:
    """The workload's cache to run against: the committed one unpacked (offline: a fresh copy; live:
    the working copy, kept between runs so an interrupted run resumes)."""
    WORK.mkdir(exist_ok=True)
    path = WORK / f"{name}.sqlite"
    if offline or not path.exists():
        with lzma.open(EVAL / w.cache) as src, open(path, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return path


async def replay(name: str, w: Workload, offline: bool, shared_path: Path) -> dict:
    from hera_core.backends.caching import CachingEngine, CompletionCache
    from hera_core.cli_offline import _Offline
    from hera_core.config import load_settings
    from hera_core.offline.evaluation import (AllLLM, Evaluator, Hera, first_step_scores, router_at_cost,
                                              summarize)
    from hera_core.offline.stats import paired_bootstrap
    from hera_core.progress import progress_bar
    from hera_core.routing.predictor import Predictor
    from hera_core.serving.assembly import open_engines

    settings = load_settings(EVAL / w.config if w.config else None)
    tasks = tasks_of(w)
    cache = CompletionCache(cache_copy(name, w, offline), read_only=offline)
    own, shared = Predictor.load(EVAL / w.own_predictor), Predictor.load(shared_path)

    async def run(local, cloud) -> dict:
        def evaluator(predictor):
            return Evaluator(CachingEngine(local, cache), CachingEngine(cloud, cache), predictor, cache,
                             settings.prices, settings.local.model)

        ev_own, ev_shared = evaluator(own), evaluator(shared)
        with progress_bar(f"{name}: 4 runs of {len(tasks)} tasks", 4 * len(tasks)) as bar:
            llm = await ev_own.run(AllLLM(), tasks, bar.advance)
            hera_own = await ev_own.run(Hera(), tasks, bar.advance)
            hera_shared = await ev_shared.run(Hera(), tasks, bar.advance)
            first = await first_step_scores(ev_shared, tasks)
            router = await router_at_cost(ev_shared, tasks, first, llm, hera_shared, bar.advance)
        llm_cost = sum(s.cloud_cost_usd for r in llm for s in r.steps)
        right = {k: [r.correct for r in v] for k, v in
                 (("own", hera_own), ("shared", hera_shared), ("router", router), ("llm", llm))}
        return {"tasks": len(tasks), "own_predictor": w.own_predictor, "shared_predictor": shared_path.name,
                "all_llm": summarize(llm, llm_cost), "hera_own": summarize(hera_own, llm_cost),
                "hera_shared": summarize(hera_shared, llm_cost), "query_router_cost": summarize(router, llm_cost),
                "shared_minus_own": paired_bootstrap(right["shared"], right["own"]),
                "shared_minus_router": paired_bootstrap(right["shared"], right["router"]),
                "shared_minus_all_llm": paired_bootstrap(right["shared"], right["llm"]),
                "tasks_routed_otherwise": sum([s.route for s in a.steps] != [s.route for s in b.steps]
                                              for a, b in zip(hera_own, hera_shared))}

    try:
        if offline:
            return await run(_Offline(settings.local.model), _Offline(settings.cloud.model))
        async with open_engines(settings) as (local, cloud):
            return await run(local, cloud)
    finally:
        cache.close()


def table(results: dict) -> None:
    for name, r in results.items():
        own, sh, ro = r["hera_own"], r["hera_shared"], r["query_router_cost"]
        d, dr = r["shared_minus_own"], r["shared_minus_router"]
        print(f"{name} ({r['tasks']} tasks): own {own['accuracy']:.1%} at {own['cost_ratio']:.2f} "
              f"({own['local_share']:.1%} local); shared {sh['accuracy']:.1%} at {sh['cost_ratio']:.2f} "
              f"({sh['local_share']:.1%} local), shared - own {100 * d['diff']:+.1f} ({100 * d['ci95'][0]:+.1f} to "
              f"{100 * d['ci95'][1]:+.1f}); router at its cost {ro['accuracy']:.1%}, shared - router "
              f"{100 * dr['diff']:+.1f} ({100 * dr['ci95'][0]:+.1f} to {100 * dr['ci95'][1]:+.1f}); "
              f"All-LLM {r['all_llm']['accuracy']:.1%}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", choices=[*WORKLOADS, "all"])
    ap.add_argument("--offline", action="store_true", help="from the committed caches only; a miss is an error")
    ap.add_argument("--predictor", default=str(SHIPPED),
                    help="the shared predictor (another than the shipped one is kept as WORKLOAD:its-file-name)")
    args = ap.parse_args()
    shared = Path(args.predictor)
    suffix = "" if shared.resolve() == SHIPPED.resolve() else f":{shared.stem}"
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if args.workload:
        names = list(WORKLOADS) if args.workload == "all" else [args.workload]
        measured = {name + suffix: asyncio.run(replay(name, WORKLOADS[name], args.offline, shared)) for name in names}
        if args.offline:
            same = all(json.dumps(m, sort_keys=True) == json.dumps(results.get(n), sort_keys=True)
                       for n, m in measured.items())
            print("the replay gives replay.json exactly" if same else "the replay differs from replay.json")
            results = {**results, **measured} if not same else results
        else:
            results.update(measured)
            RESULTS.write_text(json.dumps(results, indent=1))
    table(results)


if __name__ == "__main__":
    main()
