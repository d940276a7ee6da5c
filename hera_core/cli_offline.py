"""The offline subcommands of the `hera` command line: profile, drafts, train, eval, check-harness
and compare-labels (the evaluation's side; their arguments in `add_offline_parsers`; `hera_core/cli.py`
dispatches)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from hera_core.errors import CacheMissError, MissingExtraError, UsageError
from hera_core.progress import progress_bar

COMMITTED_EVAL = Path("bench") / "eval"  # the committed evaluation run, relative to the repository root


def _settings(args):
    from hera_core.config import load_settings

    overrides = {}
    if getattr(args, "local_model", None):
        overrides["local.model"] = args.local_model
    if getattr(args, "cloud_model", None):
        overrides["cloud.model"] = args.cloud_model
    return load_settings(args.config, overrides)


def _tasks(args, families: list[str] | None, split: str | None = None):
    """The user's JSONL tasks (--tasks-file), else the built-in families, of the chosen split."""
    from hera_core.offline.workloads import load_jsonl_tasks, make_tasks

    split = split or args.split
    split = None if split == "all" else split
    if args.tasks_file:
        return load_jsonl_tasks(args.tasks_file, split=split, seed=args.seed)
    return make_tasks(families, per_family=args.tasks_per_family, seed=args.seed, split=split)


def _openings(args, traces) -> dict[str, str]:
    """Task id -> the opening user message of each traced task (for the familiarity check), from
    the traces themselves or from the tasks they were profiled on; a task not found is left out."""
    from hera_core.offline.harness import first_messages
    from hera_core.routing.familiarity import opening_text

    out = {t["task_id"]: t["opening"] for t in traces if "opening" in t}
    missing = {t["task_id"] for t in traces} - set(out)
    families = sorted({t["family"] for t in traces if t["task_id"] in missing})
    for split in sorted({t["split"] for t in traces if t["task_id"] in missing}):
        try:
            tasks = _tasks(args, families, split=split)
        except (UsageError, MissingExtraError):  # a user family without --tasks-file, a data package not
            # installed: no familiarity for those
            continue
        out.update({t.task_id: opening_text(first_messages(t)) for t in tasks if t.task_id in missing})
    return out


def _votes(args, traces) -> dict:
    """Task id -> its first step's vote, from `--votes` files (bench/eval/agreement_probe.py's
    output: the samples' answers); the greedy draft's checks are run here, on the traced draft."""
    from hera_core.checks.drafts import check_draft
    from hera_core.offline.harness import first_messages
    from hera_core.offline.training import FirstStepVote
    from hera_core.offline.userfiles import read_lines

    rows = {}
    for path in args.votes or []:
        for n, line in enumerate(read_lines(path, "--votes file"), 1):
            try:
                row = json.loads(line)
                key, keys = row["greedy"], row["keys"]
                if not isinstance(key, str) or not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
                    raise TypeError("greedy must be a string and keys a list of strings")
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise UsageError(f"--votes file {path}, line {n}: not a vote row ({exc}); "
                                 "make it with bench/eval/agreement_probe.py") from None
            rows[row["task_id"]] = (key, keys)
    if not rows:
        return {}
    by_id = {t["task_id"]: t for t in traces if t["task_id"] in rows}
    if not by_id:
        raise UsageError("no task of --votes is in the traces: sample the first steps of the traced validation "
                         "tasks (bench/eval/agreement_probe.py --traces traces-val.jsonl)")
    out = {}
    for split in sorted({t["split"] for t in by_id.values()}):
        for task in _tasks(args, sorted({t["family"] for t in by_id.values()}), split=split):
            if task.task_id in by_id:
                draft = by_id[task.task_id]["steps"][0]["slm_text"]
                key, keys = rows[task.task_id]
                out[task.task_id] = FirstStepVote(check_draft(first_messages(task), draft).passed, key, keys)
    return out


def cmd_profile(args) -> int:
    from hera_core.offline.profiling import profile
    from hera_core.serving.assembly import open_engines

    settings = _settings(args)
    tasks = _tasks(args, args.families.split(",") if args.families else None)
    if args.labels == "stage" and any(t.kind != "workflow" for t in tasks):
        raise UsageError("--labels stage is for multi-stage workflow families (--families workflow_quote)")

    async def go():
        async with open_engines(settings, use_cache=True) as (local, cloud):
            return await profile(tasks, local, cloud, Path(args.out), seed=args.seed, labels=args.labels)

    print(f"traces: {asyncio.run(go())}")
    return 0


def cmd_drafts(args) -> int:
    from hera_core.backends.llamacpp import LlamaCppEngine
    from hera_core.install.models import model_path
    from hera_core.offline.drafts import draft_features_file
    from hera_core.offline.profiling import load_traces

    settings = _settings(args)
    src, out = Path(args.traces), Path(args.out)
    if src.resolve() == out.resolve():
        raise UsageError("--out must be another file than the traces (it is appended to, and resumable)")
    traces = load_traces(src)
    split = traces[0]["split"] if traces else args.split
    tasks = {t.task_id: t for t in _tasks(args, sorted({t["family"] for t in traces}), split=split)}

    async def go():
        engine = LlamaCppEngine(model_path(settings.local.model, settings.cache_dir), name=settings.local.model,
                                n_ctx=settings.local.n_ctx, n_threads=settings.local.n_threads, n_slots=2)
        try:
            with progress_bar("draft checks", len(traces)) as bar:
                return await draft_features_file(src, out, tasks, engine, progress=bar.advance)
        finally:
            await engine.close()

    print(f"{asyncio.run(go())} tasks added to {out}")
    return 0


def _workloads(specs: list[str] | None) -> dict | None:
    """`--workload NAME=PATTERN[,PATTERN...][:OPTION,...]` options -> {name: WorkloadSpec}."""
    from hera_core.offline.training import WORKLOAD_OPTIONS, WorkloadSpec

    if not specs:
        return None
    out: dict[str, WorkloadSpec] = {}
    for spec in specs:
        name, _, rest = spec.partition("=")
        pats, _, opts = rest.partition(":")
        name = name.strip()
        patterns = tuple(p.strip() for p in pats.split(",") if p.strip())
        options = [o.strip() for o in opts.split(",") if o.strip()]
        bad = [o for o in options if o not in WORKLOAD_OPTIONS]
        if not name or not patterns or name in out or bad:
            raise UsageError(f"--workload {spec!r}: give NAME=FAMILY[,FAMILY...][:OPTION,...] (fnmatch patterns such "
                             f"as bfcl_*; options {', '.join(WORKLOAD_OPTIONS)}), each name once")
        out[name] = WorkloadSpec(patterns, **{k: v for o in options for k, v in WORKLOAD_OPTIONS[o].items()})
    return out


def cmd_train(args) -> int:
    from hera_core.offline.profiling import load_traces
    from hera_core.offline.training import CostTarget, train

    traces = [t for path in args.traces for t in load_traces(path)]
    openings = _openings(args, traces)
    client = None
    if args.dask:
        from dask.distributed import Client

        client = Client(args.dask)
    try:
        cost = CostTarget(args.cloud_budget, _settings(args).prices) \
            if args.cost_aware or args.cloud_budget is not None else None
        predictor, report = train(traces, max_drop=args.max_drop, dask_client=client, openings=openings,
                                  votes=_votes(args, traces), cost=cost, workloads=_workloads(args.workload))
    finally:
        if client is not None:
            client.close()
    predictor.meta = {"traces": [Path(p).name for p in args.traces],
                      **({"votes": [Path(p).name for p in args.votes]} if args.votes else {}), **predictor.meta}
    predictor.save(args.out)
    print(json.dumps(report, indent=1))
    print(f"predictor: {args.out}")
    return 0


def cmd_eval(args) -> int:
    from hera_core.backends.caching import CachingEngine, CompletionCache
    from hera_core.offline.evaluation import Evaluator
    from hera_core.offline.report import estimated_curve, plot, render_report
    from hera_core.routing.predictor import Predictor
    from hera_core.offline.profiling import load_traces

    settings = _settings(args)
    if args.offline and not (args.traces or args.tasks_file or args.families) and not COMMITTED_EVAL.is_dir():
        raise UsageError(f"--offline replays the committed run in {COMMITTED_EVAL}/: run it from the repository "
                         "root, or pass --traces and --cache")
    if args.offline and not args.families:  # with no other flag, replay the committed evaluation
        args.traces = args.traces or str(COMMITTED_EVAL / "traces-test.jsonl")
        args.cache = args.cache or str(COMMITTED_EVAL / "completions.sqlite.xz")
        # the predictor that run was made with (the shipped one is now shared by every workload)
        args.predictor = args.predictor or str(COMMITTED_EVAL / "predictor.json")
        if args.tasks_per_family is None:
            args.tasks_per_family = 80
    if args.tasks_per_family is None:
        args.tasks_per_family = 30
    if args.families and (args.traces or args.tasks_file):
        raise UsageError("--families evaluates built-in tasks without traces: drop --traces / --tasks-file")
    if args.traces is None and not (args.tasks_file or args.families):
        args.traces = "traces-test.jsonl"
    traces = load_traces(args.traces) if args.traces else []
    tasks = _tasks(args, args.families.split(",") if args.families else sorted({t["family"] for t in traces}))
    if args.traces:  # the profiled tasks only (the traces carry their labels for the estimated curve)
        ids = {t["task_id"] for t in traces}
        tasks = [t for t in tasks if t.task_id in ids]
    if not tasks:
        raise UsageError(f"no task of {args.traces or args.tasks_file} is in the {args.split} split; profile it "
                         f"with `hera profile --split {args.split}` or pass --split all")
    predictor = Predictor.load(args.predictor or settings.policy.predictor_path)
    cache_path = Path(args.cache) if args.cache else settings.cache_dir / "completions.sqlite"
    if args.offline and not cache_path.exists():
        raise UsageError(f"completion cache {cache_path} does not exist; pass --cache with the committed one")
    if cache_path.suffix == ".xz":  # the committed cache is compressed: replay from a private copy
        import lzma
        import shutil
        import tempfile

        unpacked = Path(tempfile.mkdtemp(prefix="hera-eval-")) / cache_path.stem
        with lzma.open(cache_path) as src, open(unpacked, "wb") as dst:
            shutil.copyfileobj(src, dst)
        cache_path = unpacked

    async def go():
        cache = CompletionCache(cache_path, read_only=args.offline)
        try:
            if args.offline:
                slm, llm = CachingEngine(_Offline(settings.local.model), cache), CachingEngine(_Offline(settings.cloud.model), cache)
                return await _run_eval(tasks, Evaluator(slm, llm, predictor, cache, settings.prices,
                                                                settings.local.model), args)
            from hera_core.serving.assembly import open_engines

            async with open_engines(settings) as (local, cloud):
                slm, llm = CachingEngine(local, cache), CachingEngine(cloud, cache)
                return await _run_eval(tasks, Evaluator(slm, llm, predictor, cache, settings.prices,
                                                                settings.local.model), args)
        finally:
            cache.close()

    report = asyncio.run(go())
    if traces:
        report["curve_estimated"] = estimated_curve(traces, predictor)
    report["prices"] = (f"cloud at {settings.prices.cloud_price_model} prices "
                        f"(${settings.prices.cloud_input_usd_per_mtok}/${settings.prices.cloud_output_usd_per_mtok} "
                        f"per 1M input/output tokens, {settings.prices.cloud_price_date})")
    if args.plot:
        plot(report, args.plot)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    if args.json:
        print(json.dumps({name: {k: m[k] for k in ("accuracy", "local_share", "cost_ratio")}
                          for name, m in report["methods"].items()}))
    else:
        render_report(report)
        if args.plot:
            print(f"plot: {args.plot}")
    return 0


def _sweep(text: str) -> tuple[float, ...]:
    """--sweep: comma-separated threshold offsets ('' for none)."""
    try:
        return tuple(float(x) for x in text.split(",")) if text else ()
    except ValueError:
        raise UsageError(f"--sweep takes comma-separated numbers (threshold offsets), got {text!r}") from None


async def _run_eval(tasks, ev, args):
    from hera_core.offline.evaluation import evaluate

    sweep = _sweep(args.sweep)
    with progress_bar("evaluating", (8 + 2 * len(sweep)) * len(tasks), enabled=not args.json) as bar:
        return await evaluate(tasks, ev, seed=args.seed, progress=bar.advance, sweep=sweep,
                              unfamiliar=args.unfamiliar or _settings(args).policy.unfamiliar)


class _Offline:
    """Stands in for a model in --offline mode: the completion cache must answer everything."""

    is_local = False

    def __init__(self, name: str) -> None:
        self.name = name

    async def generate(self, *a, **k):
        raise CacheMissError(f"completion cache miss for {self.name} in offline mode; rerun without --offline")

    async def prefill(self, *a, **k):
        raise CacheMissError(f"feature cache miss for {self.name} in offline mode; rerun without --offline")

    async def close(self) -> None:
        return None


def cmd_check_harness(args) -> int:
    from hera_core.offline.harness import compare_with_direct
    from hera_core.serving.assembly import open_engines

    settings = _settings(args)
    tasks = _tasks(args, args.families.split(",") if args.families else None)

    async def go():
        async with open_engines(settings, use_cache=True) as (local, cloud):
            with progress_bar("harness vs direct", len(tasks)) as bar:
                return await compare_with_direct(tasks, {"slm": local, "llm": cloud}, progress=bar.advance)

    report = asyncio.run(go())
    text = json.dumps(report, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


def cmd_compare_labels(args) -> int:
    from hera_core.offline.profiling import load_traces
    from hera_core.offline.similarity import add_similarity, load_encoder
    from hera_core.offline.training import compare_labels

    encoder = load_encoder()
    train = add_similarity(load_traces(args.train), encoder)
    evals = {Path(p).stem: add_similarity(load_traces(p), encoder) for p in args.held_out}
    print(json.dumps(compare_labels(train, evals), indent=1))
    return 0


def add_offline_parsers(sub) -> None:
    """The offline subcommands' arguments, on the `hera` parser's subparsers."""
    pr = sub.add_parser("profile", help="trace both models on every agent step (resumable)")
    pr.add_argument("--out", default="traces.jsonl")
    pr.add_argument("--tasks-per-family", type=int, default=8)
    pr.add_argument("--families", help="comma-separated (default: all)")
    pr.add_argument("--tasks-file", help="your own tasks, JSONL (see docs/workloads.md: Your own tasks)")
    pr.add_argument("--split", default="train", choices=["train", "val", "test"])
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--local-model")
    pr.add_argument("--cloud-model")
    pr.add_argument("--labels", choices=["substitution", "stage"], default="substitution",
                    help="substitution: rerun the task with one step on the SLM; stage: each workflow stage on its "
                         "true upstream outputs (docs/workloads.md)")
    pr.set_defaults(func=cmd_profile)

    ev = sub.add_parser("eval", help="All-SLM, All-LLM, Random, query router, HERA and Oracle on the test split")
    ev.add_argument("--traces", help="`hera profile --split test` output (tasks, labels); default traces-test.jsonl, "
                    "none with --tasks-file, the committed run's with --offline")
    ev.add_argument("--tasks-per-family", type=int, help="default 30 (80 with --offline: the committed run)")
    ev.add_argument("--tasks-file", help="your own tasks, JSONL (the file given to `hera profile`)")
    ev.add_argument("--families", help="comma-separated built-in families, evaluated without traces (no "
                    "estimated curve)")
    ev.add_argument("--split", default="test", choices=["train", "val", "test", "all"])
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--predictor", help="predictor file (default: the configured or shipped one; with --offline "
                    "alone, the committed run's bench/eval/predictor.json)")
    ev.add_argument("--cache", help="completion cache (default: <cache_dir>/completions.sqlite)")
    ev.add_argument("--offline", action="store_true", help="replay from the cache only; a miss is an error")
    ev.add_argument("--plot", default="eval.png", help="PNG of accuracy vs cloud cost ('' for none)")
    ev.add_argument("--sweep", default="-0.6,-0.3,-0.15,-0.05,0.03,0.06,0.1",
                    help="threshold offsets of extra live HERA runs for the curve ('' for none)")
    ev.add_argument("--unfamiliar", choices=["cloud", "draft", "trust"],
                    help="HERA's policy for steps unlike its training tasks (default: the configured policy.unfamiliar)")
    ev.add_argument("--out", help="write the full report as JSON")
    ev.add_argument("--json", action="store_true", help="print {method: {accuracy, local_share, cost_ratio}}")
    ev.add_argument("--local-model")
    ev.add_argument("--cloud-model")
    ev.set_defaults(func=cmd_eval)

    ch = sub.add_parser("check-harness", help="accuracy of both models through the agent harness vs one direct call")
    ch.add_argument("--tasks-per-family", type=int, default=10)
    ch.add_argument("--families", help="comma-separated (default: all)")
    ch.add_argument("--tasks-file", help="your own tasks, JSONL")
    ch.add_argument("--split", default="val", choices=["train", "val", "test"])
    ch.add_argument("--seed", type=int, default=0)
    ch.add_argument("--out", help="also write the report as JSON")
    ch.add_argument("--local-model")
    ch.add_argument("--cloud-model")
    ch.set_defaults(func=cmd_check_harness)

    cl = sub.add_parser("compare-labels", help="substitution vs embedding-similarity label: which predicts better")
    cl.add_argument("train", help="train-split traces")
    cl.add_argument("held_out", nargs="+", help="held-out traces (val, test)")
    cl.set_defaults(func=cmd_compare_labels)

    dr2 = sub.add_parser("drafts", help="add the SLM drafts' checks and log-probabilities to traces (resumable)")
    dr2.add_argument("traces", help="traces.jsonl from `hera profile`")
    dr2.add_argument("--out", required=True, help="output JSONL (appended; a rerun skips tasks already there)")
    dr2.add_argument("--tasks-per-family", type=int, default=400, help="pool to find the traced tasks in")
    dr2.add_argument("--tasks-file", help="the JSONL tasks the traces were profiled on")
    dr2.add_argument("--split", default="train", choices=["train", "val", "test"])
    dr2.add_argument("--seed", type=int, default=0)
    dr2.add_argument("--local-model")
    dr2.set_defaults(func=cmd_drafts)

    t = sub.add_parser("train", help="fit the predictor on traces and calibrate kappa(step)")
    t.add_argument("traces", nargs="+", help="traces.jsonl files from `hera profile`")
    t.add_argument("--out", default="predictor.json")
    t.add_argument("--max-drop", type=float, default=0.03, help="accuracy drop allowed vs All-LLM (default 0.03)")
    t.add_argument("--dask", metavar="ADDRESS", help="train on an existing Dask cluster")
    t.add_argument("--tasks-file", help="the JSONL tasks the traces were profiled on (for the familiarity check)")
    t.add_argument("--tasks-per-family", type=int, default=400, help="pool to find the traced built-in tasks in")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--votes", nargs="+", metavar="VOTES.jsonl",
                   help="first-step sample votes of validation tasks (bench/eval/agreement_probe.py): "
                        "calibrates the vote stage with kappa")
    t.add_argument("--cost-aware", action="store_true",
                   help="weigh each step's threshold by its expected cloud cost too (one trade-off across a "
                        "task's steps), calibrated for the least cloud cost within --max-drop")
    t.add_argument("--cloud-budget", type=float, metavar="SHARE",
                   help="with --cost-aware implied: the best estimated accuracy at most this share of "
                        "All-LLM's cloud cost (0-1] on the validation tasks")
    t.add_argument("--workload", action="append", metavar="NAME=FAMILY,...[:OPTION,...]",
                   help="one operating point (kappa, its own draft stage) per workload, calibrated on its own "
                        "validation tasks and chosen at run time by the familiarity check; FAMILY: traced family "
                        "names or fnmatch patterns (bfcl_*); OPTION: no-draft (never drafted), kappa-alone (no "
                        "cost weight even with --cost-aware); repeat for each workload, every traced family in one")
    t.set_defaults(func=cmd_train)
