"""Where `Runtime.complete`'s time goes on each route: the setting of bench/test_runtime.py
(instant engines, the shipped predictor, a SQLite ledger), profiled three ways.

1. The median of `complete` per route, and of the bare engine call, over N calls each.
2. Inclusive time of its parts (medians per call): each part is wrapped in a timer for this run
   only (about 0.3 us of wrapper per part), so the parts are measured in place, on the same calls.
3. cProfile over N calls per route: the functions with the most own time (cProfile's overhead
   inflates every Python call; use it for the ranking, the medians above for the sizes).

    .venv/bin/python -m bench.profile_runtime [--calls 3000] [--top 15]

Nothing here changes HERA: the timers are monkeypatched onto a runtime built for this run.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import functools
import io
import pstats
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from bench.test_runtime import MESSAGES, InstantEngine

from hera_core.config import PriceSettings
from hera_core.native.features import logit_features
from hera_core.routing import booking as booking_mod
from hera_core.routing import familiarity as familiarity_mod
from hera_core.routing import ledger as ledger_mod
from hera_core.routing import predictor as predictor_mod
from hera_core.routing import runtime as runtime_mod
from hera_core.routing import scoring as scoring_mod
from hera_core.routing import step as step_mod
from hera_core.routing.ledger import Ledger
from hera_core.routing.predictor import Predictor
from hera_core.routing.runtime import Runtime

ROUTES = {"cloud": 1.01, "local": 0.0}

# (label, owner, attribute): a part of `complete`, timed where it is looked up. Parts that a
# refactor removed are left out of the table (named in its footer).
PARTS = [
    ("complete (whole)", runtime_mod.Runtime, "complete"),
    ("  StepRequest (the request object)", step_mod.StepRequest, "__init__"),
    ("    step_index", step_mod, "step_index"),
    ("  _start (the step in flight)", runtime_mod.Runtime, "_start"),
    ("  _plan: familiarity + score + plan_step", runtime_mod.Runtime, "_plan"),
    ("    Predictor.locate (familiar? which workload's point: one lookup)", predictor_mod.Predictor, "locate"),
    ("      Familiarity.similarities (TF-IDF, the training families' centroids)", familiarity_mod.Familiarity,
     "similarities"),
    ("    _score: prefill + features + predictor + kappa", runtime_mod.Runtime, "_score"),
    ("      engine prefill (instant: returns a stored row)", InstantEngine, "prefill"),
    ("      ScoreBatcher.now (a lone step, scored in place)", scoring_mod.ScoreBatcher, "now"),
    ("        Predictor.score_logits (features + row + forest: one native call)", predictor_mod.Predictor,
     "score_logits"),
    ("      structure_features", runtime_mod, "structure_features"),
    ("      kappa.at (cost-weighted threshold)", predictor_mod.Kappa, "at"),
    ("    plan_step", runtime_mod, "plan_step"),
    ("  _answer_in_cloud (the cloud route's engine call, instant)", runtime_mod.Runtime, "_answer_in_cloud"),
    ("  _answer_locally (the local route's)", runtime_mod.Runtime, "_answer_locally"),
    ("  prices.cloud_cost", PriceSettings, "cloud_cost"),
    ("  Booker.answered (ledger row, budget settled)", booking_mod.Booker, "answered"),
    ("    Ledger.record_values (queued for the writer; 'commit': INSERT + COMMIT)", ledger_mod.Ledger,
     "record_values"),
]


def make_runtime(tmp: Path, durability: str = "async") -> Runtime:
    return Runtime(InstantEngine("slm", True), InstantEngine("llm", False), Predictor.load(),
                   Ledger(tmp / f"ledger-{durability}.sqlite", durability=durability), PriceSettings())


def call_times(loop, fn, calls: int) -> list[float]:
    out = []
    for _ in range(calls):
        t0 = time.perf_counter()
        loop.run_until_complete(fn())
        out.append(time.perf_counter() - t0)
    return out


def wrap_parts(times: dict[str, list[float]]) -> tuple[list, list[str]]:
    """Timers around PARTS; (what to restore, the labels of parts that do not exist)."""
    undo, missing = [], []
    for label, owner, attr in PARTS:
        original = owner.__dict__.get(attr) if isinstance(owner, type) else getattr(owner, attr, None)
        if original is None:
            missing.append(label)
            continue
        fn = original.__func__ if isinstance(original, staticmethod) else original
        if asyncio.iscoroutinefunction(fn):
            async def timed(*a, _fn=fn, _label=label, **k):
                t0 = time.perf_counter()
                try:
                    return await _fn(*a, **k)
                finally:
                    times[_label].append(time.perf_counter() - t0)
        else:
            def timed(*a, _fn=fn, _label=label, **k):
                t0 = time.perf_counter()
                try:
                    return _fn(*a, **k)
                finally:
                    times[_label].append(time.perf_counter() - t0)
        timed = functools.wraps(fn)(timed)
        setattr(owner, attr, staticmethod(timed) if isinstance(original, staticmethod) else timed)
        undo.append((owner, attr, original))
    return undo, missing


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--durability", choices=ledger_mod.DURABILITY, default="async",
                    help="the ledger of parts 2 and 3 (part 1 measures both)")
    args = ap.parse_args()
    loop = asyncio.new_event_loop()
    with tempfile.TemporaryDirectory() as tmp:
        rts = {d: make_runtime(Path(tmp), d) for d in ledger_mod.DURABILITY}
        rt = rts[args.durability]
        row = loop.run_until_complete(rt.local.prefill(MESSAGES)).logits.reshape(1, -1)

        fns = {"engine direct": lambda: rt.local.generate(MESSAGES)}
        for route, thr in ROUTES.items():
            # looked up at each call: the timers of part 2 wrap Runtime.complete too
            fns[route] = functools.partial(lambda t: rt.complete(MESSAGES, session="profile", threshold=t), thr)
        both = {f"{route} ({d})": functools.partial(
            lambda r, t: r.complete(MESSAGES, session="profile", threshold=t), rts[d], thr)
            for route, thr in ROUTES.items() for d in ledger_mod.DURABILITY}
        for route in ROUTES:
            result = loop.run_until_complete(fns[route]())
            assert (result.route.value, result.decision.reason) == (route, "predictor"), result.decision
        for fn in [*fns.values(), *both.values()]:
            call_times(loop, fn, 300)  # warm-up

        print(f"1. medians over {args.calls} calls, interleaved in rounds of 100 (us); overhead = complete "
              "- features - the engine call")
        samples: dict[str, list[float]] = defaultdict(list)
        names = {"engine direct": fns["engine direct"], **both}
        for _ in range(max(1, args.calls // 100)):
            for name, fn in names.items():
                samples[name] += call_times(loop, fn, 100)
            for _ in range(100):  # the features, the part of `complete` the target leaves out besides the prefill
                t0 = time.perf_counter()
                logit_features(row)
                samples["features"].append(time.perf_counter() - t0)
        medians = {name: statistics.median(xs) * 1e6 for name, xs in samples.items()}
        for name, xs in samples.items():
            extra = ""
            if name in both:
                extra = f"  overhead {medians[name] - medians['features'] - medians['engine direct']:7.1f}"
            print(f"   {name:16s} median {medians[name]:7.1f}  p90 {statistics.quantiles(xs, n=10)[-1] * 1e6:7.1f}{extra}")

        print(f"\n2. inclusive time of the parts, median per call (us), {args.calls} calls per route")
        per_route: dict[str, dict[str, list[float]]] = {}
        for route in ROUTES:
            times: dict[str, list[float]] = defaultdict(list)
            undo, missing = wrap_parts(times)
            try:
                call_times(loop, fns[route], args.calls)
            finally:
                for owner, attr, original in reversed(undo):
                    setattr(owner, attr, original)
            per_route[route] = times
        print(f"   {'part':58s} {'cloud':>7s} {'local':>7s}  calls/step")
        for label, _, _ in PARTS:
            if label in missing:
                continue
            cells = []
            for route in ROUTES:
                xs = per_route[route].get(label, [])
                cells.append(f"{statistics.median(xs) * 1e6:7.1f}" if xs else f"{'-':>7s}")
            n = len(per_route["local"].get(label, [])) / args.calls
            print(f"   {label:58s} {cells[0]} {cells[1]}  {n:.0f}")
        if missing:
            print(f"   (not in this runtime: {', '.join(m.strip() for m in missing)})")

        print(f"\n3. cProfile, {args.calls} calls per route: top {args.top} by own time (us per step)")
        for route in ROUTES:
            prof = cProfile.Profile()
            prof.enable()
            call_times(loop, fns[route], args.calls)
            prof.disable()
            out = io.StringIO()
            stats = pstats.Stats(prof, stream=out)
            rows = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:args.top]
            print(f"   {route} route")
            for (file, line, func), (_, ncalls, tottime, cumtime, _) in rows:
                where = f"{Path(file).parent.name}/{Path(file).name}:{line}" if line else file
                print(f"     {tottime / args.calls * 1e6:7.1f} own {cumtime / args.calls * 1e6:7.1f} cum "
                      f"{ncalls / args.calls:5.1f}x  {func}  ({where})")
        for r in rts.values():
            r.ledger.close()
    loop.close()


if __name__ == "__main__":
    main()
