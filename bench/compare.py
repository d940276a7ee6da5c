"""Benchmark regression check: HERA against its reference, as ratios, against a committed baseline.

Absolute times change with the machine and its load; the ratio of HERA's side to its reference
measured in the same run (runtime vs the bare engine call, `hera serve` vs calling the upstream
directly, native vs XGBoost or numpy, sandboxed vs plain child process, ...) changes far less. Each
`Ratio` below names its two benchmarks and which way is better; `make bench-compare` runs the
benchmarks they need, computes the ratios and fails when one is worse than bench/baseline.json's
by more than the margin stated there; `make bench-baseline` rewrites the baseline from fresh runs.
A ratio past its margin is measured twice more (its benchmarks alone) and judged by the median of
the three: one noisy run does not fail the check, a real regression fails it three times out of three.

    python -m bench.compare check                  # run, compare, exit 1 on a regression
    python -m bench.compare baseline --runs 5      # run 5 times: each ratio's median and margin
    python -m bench.compare check --json run.json  # compare an existing pytest-benchmark JSON
    python -m bench.compare spread a.json b.json   # the run-to-run spread of each ratio

Extra pytest arguments go after `--` (`make bench-compare BENCH_ARGS=...`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASELINE = ROOT / "bench" / "baseline.json"
# The smallest margin (relative). A ratio whose baseline runs spread wider (max/min - 1) gets that
# spread, rounded up to 5%, as its own margin: the check then fails on what no baseline run showed.
DEFAULT_MARGIN = 0.25
MIN_RUNS_FOR_MARGINS = 3


@dataclass(frozen=True)
class Side:
    test: str  # pytest node id below bench/: "test_runtime.py::test_engine_direct"
    # "median" / "mean" / "min" (pytest-benchmark stats, seconds) or an extra_info key. "min" for pure
    # computation (noise only adds time: the fastest round is the steadiest measure of it), a ratio the
    # benchmark measured itself on alternating calls where both sides are under the same load.
    value: str = "median"


@dataclass(frozen=True)
class Ratio:
    name: str
    hera: Side
    reference: Side | None  # None: the benchmark measured both sides and reports the ratio as `hera`
    better: str  # "lower" (HERA costs this many times the reference) or "higher" (throughput)
    what: str

    def value(self, runs: dict[str, dict]) -> float | None:
        a = _get(runs, self.hera)
        b = _get(runs, self.reference) if self.reference is not None else 1.0
        return None if a is None or b is None or b == 0 else a / b

    def regressed(self, baseline: float, now: float, margin: float) -> bool:
        return now > baseline * (1 + margin) if self.better == "lower" else now < baseline / (1 + margin)


def _get(runs: dict[str, dict], side: Side) -> float | None:
    bench = runs.get(side.test)
    if bench is None:
        return None
    if side.value in ("median", "mean", "min"):
        return bench["stats"][side.value]
    got = bench.get("extra_info", {}).get(side.value)
    return float(got) if got is not None else None


R, P, S = "test_runtime.py::", "test_proxy.py::", "test_scoring.py::"
RATIOS = [
    Ratio("runtime_cloud_vs_engine", Side(R + "test_runtime_complete[cloud-1.01]", "ratio_vs_engine"), None,
          "lower", "Runtime.complete on the cloud route / the bare engine call (medians of alternating calls, "
          "instant engines)"),
    Ratio("runtime_local_vs_engine", Side(R + "test_runtime_complete[local-0.0]", "ratio_vs_engine"), None,
          "lower", "Runtime.complete on the local route / the bare engine call (medians of alternating calls, "
          "instant engines)"),
    Ratio("scoring_together_vs_one_by_one", Side(R + "test_scoring_8_concurrent_steps[together]", "min"),
          Side(R + "test_scoring_8_concurrent_steps[one-by-one]", "min"), "lower",
          "8 steps scored in one batch / one after another (fastest rounds)"),
    Ratio("proxy_p50_c1_hera_vs_direct", Side(P + "test_proxy_hera[c1]", "p50_ms"),
          Side(P + "test_proxy_direct[c1]", "p50_ms"), "lower",
          "p50 latency at 1 client: through `hera serve` / calling the upstream directly"),
    Ratio("proxy_p50_c1_hera_vs_forwarder", Side(P + "test_proxy_hera[c1]", "p50_ms"),
          Side(P + "test_proxy_forwarder[c1]", "p50_ms"), "lower",
          "p50 latency at 1 client: through `hera serve` / through a bare aiohttp forwarder (the hop alone)"),
    Ratio("proxy_rps_c64_hera_vs_direct", Side(P + "test_proxy_hera[c64]", "rps"),
          Side(P + "test_proxy_direct[c64]", "rps"), "higher",
          "requests/s at 64 clients: through `hera serve` / direct"),
    Ratio("proxy_rps_c64_hera_vs_litellm", Side(P + "test_proxy_hera[c64]", "rps"),
          Side(P + "test_proxy_litellm[c64]", "rps"), "higher",
          "requests/s at 64 clients: through `hera serve` / through LiteLLM's proxy"),
    *[Ratio(f"forest_native_vs_xgboost_b{b}", Side(S + f"test_forest_native[b{b}]", "min"),
            Side(S + f"test_forest_xgboost[b{b}]", "min"), "lower",
            f"native forest / XGBoost inplace_predict, {b} rows (fastest rounds)") for b in (1, 16, 256, 4096)],
    *[Ratio(f"features_native_vs_numpy_b{b}", Side(S + f"test_features_native[b{b}]", "min"),
            Side(S + f"test_features_numpy[b{b}]", "min"), "lower",
            f"native logit features / the numpy twin, {b} rows (fastest rounds)") for b in (1, 64)],
    Ratio("radix_native_vs_python", Side("test_kvcache_index.py::test_radix_native", "min"),
          Side("test_kvcache_index.py::test_radix_python", "min"), "lower",
          "native radix index / the Python twin, 8 sessions x 6 steps (fastest rounds)"),
    *[Ratio(f"sandbox_isolated_vs_plain_{p}", Side(f"test_sandbox.py::test_sandbox_run[{p}]", "ratio_vs_plain"),
            None, "lower",
            f"the bubblewrap sandbox / a plain child process, program `{p}` (medians of 40)") for p in ("print", "draft")],
    Ratio("ledger_postgresql_vs_sqlite", Side("test_fleet_ledger.py::test_step_bookkeeping_postgresql_fleet",
                                              "ratio_vs_sqlite"), None, "lower",
          "a cloud step's booking and budget hold/settle: fleet PostgreSQL / the node's SQLite "
          "(alternating blocks)"),
]


def _load(path: Path) -> dict[str, dict]:
    """A pytest-benchmark JSON as {node id below bench/: benchmark}."""
    return {b["fullname"].split("bench/", 1)[-1]: b for b in json.loads(path.read_text())["benchmarks"]}


def node_ids(names: list[str] | None = None) -> list[str]:
    """The benchmarks (pytest node ids) that the ratios `names` (None: all) need."""
    ids = {side.test for r in RATIOS if names is None or r.name in names
           for side in (r.hera, r.reference) if side is not None}
    return sorted(f"bench/{i}" for i in ids)


def run_benchmarks(out: Path, extra: list[str], names: list[str] | None = None) -> None:
    """The benchmarks the ratios `names` (None: all) need, in one pytest run, into the JSON `out`.
    At least 15 rounds each (the Python radix index takes 5 by default: too few for a steady median)."""
    ids = node_ids(names)
    cmd = [sys.executable, "-m", "pytest", *ids, "--benchmark-only", f"--benchmark-json={out}",
           "--benchmark-min-rounds=15", "-q", "-p", "no:cacheprovider", *extra]
    print(f"hera bench-compare: pytest {len(ids)} benchmarks", flush=True)
    done = subprocess.run(cmd, cwd=ROOT)
    if done.returncode != 0:
        sys.exit(f"hera bench-compare: the benchmarks failed (pytest exit {done.returncode})")


def ratios(runs: dict[str, dict]) -> dict[str, float | None]:
    return {r.name: r.value(runs) for r in RATIOS}


def compare(baseline: dict, now: dict[str, float | None]) -> tuple[list[list[str]], list[str]]:
    """(table rows, the names that regressed or could not be measured)."""
    default = float(baseline.get("margin", DEFAULT_MARGIN))
    rows, bad = [], []
    for r in RATIOS:
        base = baseline["ratios"].get(r.name, {})
        b, n = base.get("value"), now.get(r.name)
        margin = float(base.get("margin", default))
        if b is None:
            rows.append([r.name, "-", _fmt(n), "", "", "new (not in the baseline)"])
            continue
        if n is None:
            rows.append([r.name, _fmt(b), "-", "", "", "NOT MEASURED"])
            bad.append(r.name)
            continue
        limit = b * (1 + margin) if r.better == "lower" else b / (1 + margin)
        worse = r.regressed(b, n, margin)
        change = (n / b - 1) * 100
        rows.append([r.name, _fmt(b), _fmt(n), f"{change:+.0f}%", f"{'<=' if r.better == 'lower' else '>='} "
                     f"{_fmt(limit)}", "REGRESSED" if worse else "ok"])
        if worse:
            bad.append(r.name)
    return rows, bad


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}" if x < 100 else f"{x:.0f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def _machine() -> str:
    """The CPU as the ratios depend on it: its name, family and model (one name, "AMD EPYC", covers
    several generations, whose native / numpy / XGBoost ratios differ) and whether it has AVX-512."""
    if not Path("/proc/cpuinfo").exists():
        return f"{platform.processor()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}"
    info: dict[str, str] = {}
    for ln in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = ln.partition(":")
        info.setdefault(key.strip(), value.strip())
    cpu = info.get("model name", platform.processor())
    if "cpu family" in info:
        cpu += f" (family {info['cpu family']} model {info.get('model', '?')}"
        cpu += ", AVX-512)" if "avx512f" in info.get("flags", "").split() else ")"
    return f"{cpu}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}"


def _runs(args, extra: list[str], n: int, loads: list[float] | None = None) -> list[dict[str, dict]]:
    if args.json:
        return [_load(Path(p)) for p in args.json]
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(n):
            path = Path(tmp) / f"run{i}.json"
            if loads is not None:
                loads.append(round(os.getloadavg()[0], 2))
            run_benchmarks(path, extra)
            out.append(_load(path))
            if args.keep:
                Path(args.keep).mkdir(parents=True, exist_ok=True)
                (Path(args.keep) / path.name).write_text(path.read_text())
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("check", "baseline"):
        p = sub.add_parser(name)
        p.add_argument("--json", nargs="+", help="pytest-benchmark JSON files to use instead of running")
        p.add_argument("--keep", help="a folder to keep the runs' JSON in")
        p.add_argument("--baseline", default=str(BASELINE))
    sub.choices["baseline"].add_argument("--note", help="a line kept in the baseline (the machine's load, say)")
    sub.choices["check"].add_argument("--confirm", type=int, default=2,
                                      help="reruns of a ratio past its margin; judged by the median (0: none)")
    sub.choices["baseline"].add_argument("--runs", type=int, default=5,
                                         help=f"runs; the baseline is each ratio's median, and with at least "
                                              f"{MIN_RUNS_FOR_MARGINS} its margin comes from their spread")
    sp = sub.add_parser("spread")
    sp.add_argument("json", nargs="+")
    args = ap.parse_args(argv)

    if args.cmd == "spread":
        per_run = [ratios(_load(Path(p))) for p in args.json]
        rows = []
        for r in RATIOS:
            xs = [x[r.name] for x in per_run if x[r.name] is not None]
            spread = (max(xs) / min(xs) - 1) * 100 if len(xs) > 1 else float("nan")
            rows.append([r.name, *(_fmt(x[r.name]) for x in per_run), f"{spread:.0f}%"])
        print(_table(["ratio", *(f"run {i + 1}" for i in range(len(per_run))), "max/min - 1"], rows))
        return 0

    path = Path(args.baseline)
    if args.cmd == "baseline":
        loads: list[float] = []
        per_run = [ratios(r) for r in _runs(args, extra, args.runs, loads)]
        old = json.loads(path.read_text()) if path.exists() else {}
        margins = {k: v["margin"] for k, v in old.get("ratios", {}).items() if "margin" in v}
        if len(per_run) >= MIN_RUNS_FOR_MARGINS:  # from this baseline's own runs
            margins = {}
            for r in RATIOS:
                xs = [x[r.name] for x in per_run if x[r.name] is not None]
                if len(xs) >= MIN_RUNS_FOR_MARGINS and max(xs) / min(xs) - 1 > DEFAULT_MARGIN:
                    margins[r.name] = math.ceil((max(xs) / min(xs) - 1) * 20 - 1e-9) / 20
        base = {"about": "HERA / its reference in the same run; `make bench-compare` fails when a ratio is worse than "
                         "`value` by more than its margin (relative; `margin` unless it states its own); "
                         "`make bench-baseline` rewrites it (docs/benchmarks.md)",
                "margin": DEFAULT_MARGIN, "machine": _machine().split(", load")[0], "runs": len(per_run),
                "load_1min_at_start": loads or None, "note": args.note, "ratios": {}}
        for r in RATIOS:
            xs = [x[r.name] for x in per_run if x[r.name] is not None]
            if not xs:
                print(f"hera bench-baseline: {r.name} was not measured; left out", file=sys.stderr)
                continue
            entry = {"value": round(statistics.median(xs), 5), "better": r.better, "what": r.what,
                     "runs": [round(x, 5) for x in xs]}
            if r.name in margins:
                entry["margin"] = margins[r.name]
            base["ratios"][r.name] = entry
        # one line per ratio: a refresh reads as a diff of values
        head = json.dumps({k: v for k, v in base.items() if k != "ratios"}, indent=1)[:-2]
        body = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in base["ratios"].items())
        path.write_text(f'{head},\n "ratios": {{\n{body}\n }}\n}}\n')
        json.loads(path.read_text())
        print(_table(["ratio", "baseline"], [[k, _fmt(v["value"])] for k, v in base["ratios"].items()]))
        print(f"hera bench-baseline: wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
        return 0

    if not path.exists():
        sys.exit(f"hera bench-compare: no baseline at {path}; `make bench-baseline` writes one")
    baseline = json.loads(path.read_text())
    [run] = _runs(args, extra, 1) if not args.json else [_load(Path(args.json[0]))]
    now = ratios(run)
    rows, bad = compare(baseline, now)
    measured = [b for b in bad if now[b] is not None]
    if measured and args.confirm and not args.json:
        print(_table(["ratio", "baseline", "now", "change", "limit", ""], rows))
        print(f"hera bench-compare: {', '.join(measured)} past the margin; measuring again {args.confirm} times")
        seen = {name: [now[name]] for name in measured}
        with tempfile.TemporaryDirectory() as tmp:
            for i in range(args.confirm):
                rerun = Path(tmp) / f"confirm{i}.json"
                run_benchmarks(rerun, extra, measured)
                for name, value in ratios(_load(rerun)).items():
                    if name in seen and value is not None:
                        seen[name].append(value)
        for name, values in seen.items():
            now[name] = statistics.median(values)
            print(f"  {name}: {', '.join(_fmt(v) for v in values)} -> median {_fmt(now[name])}")
        rows, bad = compare(baseline, now)
    print(_table(["ratio", "baseline", "now", "change", "limit", ""], rows))
    now_machine = _machine()
    print(f"machine now: {now_machine}; baseline: {baseline.get('machine', '?')}")
    if now_machine.split(", load")[0] != baseline.get("machine"):
        print("hera bench-compare: the baseline was measured on another CPU: ratios of native code to numpy or "
              "XGBoost move between CPU generations (docs/benchmarks.md); `make bench-baseline` on this one")
    if bad:
        print(f"hera bench-compare: FAILED: {', '.join(bad)} (margin {baseline.get('margin', DEFAULT_MARGIN):.0%} "
              "unless a ratio states its own)")
        return 1
    print("hera bench-compare: every ratio within its margin of the baseline")
    return 0


if __name__ == "__main__":
    sys.exit(main())
