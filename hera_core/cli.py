"""The `hera` command line. Errors print one line that names the fix (exit status 2)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path

from hera_core.errors import HeraError, MissingExtraError, SelfTestFailed
from hera_core.cli_offline import (_settings, cmd_check_harness, cmd_compare_labels, cmd_drafts, cmd_eval,
                                  cmd_profile, cmd_train)

def cmd_models(args) -> int:
    from hera_core.install.models import MODELS, ensure, is_installed

    if args.action == "list":
        for spec in MODELS.values():
            state = "installed" if is_installed(spec) else "missing"
            print(f"{spec.name:22} {spec.size / 1e6:8.1f} MB  {state:9}  {spec.description}")
        return 0
    for name in args.names or ["smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"]:
        print(f"{name}: {ensure(name, progress=sys.stderr.isatty())}")
    return 0


def cmd_ledger(args) -> int:
    """The ledger's totals, per node and per session: this node's SQLite file, or the PostgreSQL
    ledger a fleet shares (ledger_url)."""
    from hera_core.serving.assembly import open_ledger

    ledger = open_ledger(_settings(args))
    try:
        totals, nodes, sessions = ledger.totals(args.run), ledger.per_node(args.run), ledger.sessions(args.run)
    finally:
        ledger.close()
    saving = totals["saving_usd"] / totals["all_cloud_cost_usd"] if totals["all_cloud_cost_usd"] else 0.0
    if args.json:
        print(json.dumps({"run": args.run, "totals": totals, "saving_vs_all_cloud": saving, "nodes": nodes,
                          "sessions": sessions[-args.sessions:]}))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"{totals['subtasks']} subtasks, {totals['local_share']:.1%} local, cost ${totals['cost_usd']:.6f}, "
                  f"all-cloud ${totals['all_cloud_cost_usd']:.6f}: saving {saving:.1%}"
                  + (f" (run {args.run})" if args.run else ""))
    for title, rows, key in (("per node", nodes, "node"), (f"last {args.sessions} sessions", sessions[-args.sessions:],
                                                            "session")):
        t = Table(title=title)
        for col in (key, "subtasks", "local", "cost USD", "all-cloud USD"):
            t.add_column(col, justify="right")
        for r in rows:
            t.add_row(str(r[key]), str(r["subtasks"]), str(r["local_subtasks"]), f"{r['cost_usd']:.6f}",
                      f"{r['all_cloud_cost_usd']:.6f}")
        console.print(t)
    return 0


def cmd_doctor(args) -> int:
    from hera_core.install.doctor import run_checks

    checks = run_checks(Path(args.model) if args.model else None)
    for c in checks:
        print(f"{'FAIL' if not c.ok else 'WARN' if c.warning else 'ok  '}  {c.name:16} {c.detail}"
              + (f" (fix: {c.fix})" if c.warning and c.fix else ""))
    failed = [c for c in checks if not c.ok]
    if failed:  # the first failure is the one to fix first: one line, naming the fix
        raise SelfTestFailed(f"{failed[0].name}: {failed[0].detail}; fix: {failed[0].fix}")
    return 0


# The commands that run the offline tools and the extras of pyproject.toml they need; checked before
# the command starts, so a lean install fails in one line at once, not at the end of a long run.
EXTRAS_OF_COMMAND = {"demo": ("eval",), "profile": ("eval",), "eval": ("eval",), "check-harness": ("eval",),
                     "drafts": ("eval",), "train": ("eval",), "compare-labels": ("eval", "similarity"),
                     "learn": ("learn",)}


def missing_extras(extras: tuple[str, ...]) -> list[str]:
    """Those of `extras` with a distribution that is not installed, read from hera-core's own
    metadata (its Requires-Dist lines); none when hera-core itself is not installed."""
    import importlib.metadata as md
    import re

    try:
        reqs = md.requires("hera-core") or []
    except md.PackageNotFoundError:
        return []
    missing = []
    for extra in extras:
        for req in reqs:
            if re.search(rf"""extra\s*==\s*["']{extra}["']""", req):
                try:
                    md.version(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", req).group(0))
                except md.PackageNotFoundError:
                    missing.append(extra)
                    break
    return missing


def cmd_cloud_sim(args) -> int:
    from aiohttp import web

    from hera_core.serving.cloud_sim import create_app
    from hera_core.backends.llamacpp import LlamaCppEngine
    from hera_core.install.models import model_path
    from hera_core.serving.http import RUNNER_OPTIONS

    engine = LlamaCppEngine(model_path(args.model), name=args.model, n_ctx=args.n_ctx, n_threads=args.threads)
    web.run_app(create_app(engine), host=args.host, port=args.port, print=None, access_log=None,
                **RUNNER_OPTIONS)
    return 0


def cmd_serve(args) -> int:
    from aiohttp import web

    from hera_core.serving.http import RUNNER_OPTIONS, raise_open_files_limit
    from hera_core.serving.server import create_app

    overrides = {}
    if args.host:
        overrides["server.host"] = args.host
    if args.port is not None:
        overrides["server.port"] = args.port
    from hera_core.config import load_settings

    settings = load_settings(args.config, overrides)
    s = settings.server
    raise_open_files_limit(4 * s.max_concurrency + 256)  # a client and a cloud socket per request, and more
    print(f"hera serve: http://{s.host}:{s.port}/v1 (model 'hera' is routed; others pass through)", flush=True)
    web.run_app(create_app(settings), host=s.host, port=s.port, print=None, access_log=None, **RUNNER_OPTIONS)
    return 0


def cmd_demo(args) -> int:
    from hera_core.offline.demo import render, run_demo

    result = asyncio.run(run_demo(_settings(args), args.tasks, seed=args.seed, progress=not args.json,
                                  use_cache=not args.no_cache))
    if args.json:
        print(json.dumps(result))
    else:
        render(result)
    return 0


def cmd_learn(args) -> int:
    """The served agent's predictor, learned from its traffic (docs/learning.md): `hera learn`
    labels what is pending and trains the next version; `status` and `rollback`."""
    from hera_core.routing.learning import LiveLearner
    from hera_core.routing.predictor import Predictor

    settings = _settings(args)
    folder = Path(args.folder) if args.folder else settings.cache_dir / "learning"
    learner = LiveLearner(settings.learning, folder, Predictor.load(settings.policy.predictor_path))
    try:
        if args.action == "status":
            status = learner.status()
            status["learned"] = {v: learner.versions.load(v).meta.get("learned_from_traffic")
                                 for v in status["versions"] if v != "v0"}
            print(json.dumps(status, indent=1))
            return 0
        event = learner.rollback_now() if args.action == "rollback" else learner.learn_now()
    finally:
        learner.close()
    print(f"now using predictor {event.version}: {event.reason}")
    if args.action == "train":
        report = event.predictor.meta.get("learned_from_traffic", {})
        print(f"held-out steps kept local: {report.get('held_out_local_share', 0):.1%}, their agreement's lower bound "
              f"{report.get('agreement_lower_bound')} (target {report.get('target_agreement')}); {report.get('note')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hera", description="Route AI-agent steps between a local SLM and a cloud LLM.")
    p.add_argument("--config", help="TOML settings file (see docs/configuration.md)")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("models", help="list or install the GGUF models")
    m.add_argument("action", choices=["list", "ensure"])
    m.add_argument("names", nargs="*", help="model names (default: all)")
    m.set_defaults(func=cmd_models)

    lg = sub.add_parser("ledger", help="cost ledger totals, per node and per session (SQLite, or the fleet's PostgreSQL)")
    lg.add_argument("--run", help="only rows of this run label")
    lg.add_argument("--sessions", type=int, default=20, help="how many of the latest sessions to list")
    lg.add_argument("--json", action="store_true")
    lg.set_defaults(func=cmd_ledger)

    dr = sub.add_parser("doctor", help="self-test the install: versions, native build, a greedy decode in a child process")
    dr.add_argument("--model", help="GGUF to decode with (default: the installed SmolLM2-135M)")
    dr.set_defaults(func=cmd_doctor)

    c = sub.add_parser("cloud-sim", help="serve a GGUF model over an OpenAI-compatible API (stand-in cloud)")
    c.add_argument("--model", default="qwen2.5-coder-1.5b")
    c.add_argument("--host", default="127.0.0.1")
    c.add_argument("--port", type=int, default=8077)
    c.add_argument("--threads", type=int, default=1)
    c.add_argument("--n-ctx", type=int, default=4096)
    c.set_defaults(func=cmd_cloud_sim)

    ln = sub.add_parser("learn", help="learn the served agent's predictor from its traffic (shadow drafts), "
                        "show the versions, or roll back")
    ln.add_argument("action", nargs="?", choices=["train", "status", "rollback"], default="train")
    ln.add_argument("--folder", help="where the trace store and predictor versions live (default: "
                    "<cache_dir>/learning)")
    ln.set_defaults(func=cmd_learn)

    sv = sub.add_parser("serve", help="OpenAI-compatible hybrid endpoint (model 'hera' is routed per step)")
    sv.add_argument("--host")
    sv.add_argument("--port", type=int)
    sv.set_defaults(func=cmd_serve)

    d = sub.add_parser("demo", help="run agent tasks with HERA and all-cloud, print the comparison")
    d.add_argument("--tasks", type=int, default=16, help="number of tasks (default 16, about 2 minutes here)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    d.add_argument("--no-cache", action="store_true", help="do not answer repeated requests from the completion cache")
    d.add_argument("--local-model")
    d.add_argument("--cloud-model")
    d.set_defaults(func=cmd_demo)

    pr = sub.add_parser("profile", help="trace both models on every agent step (resumable)")
    pr.add_argument("--out", default="traces.jsonl")
    pr.add_argument("--tasks-per-family", type=int, default=8)
    pr.add_argument("--families", help="comma-separated (default: all)")
    pr.add_argument("--tasks-file", help="your own tasks, JSONL (see docs/workloads.md: Your own tasks)")
    pr.add_argument("--split", default="train", choices=["train", "val", "test"])
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--local-model")
    pr.add_argument("--cloud-model")
    pr.set_defaults(func=cmd_profile)

    ev = sub.add_parser("eval", help="All-SLM, All-LLM, Random, query router, HERA and Oracle on the test split")
    ev.add_argument("--traces", help="`hera profile --split test` output (tasks, labels); default traces-test.jsonl, "
                    "none with --tasks-file, the committed run's with --offline")
    ev.add_argument("--tasks-per-family", type=int, help="default 30 (80 with --offline: the committed run)")
    ev.add_argument("--tasks-file", help="your own tasks, JSONL (the file given to `hera profile`)")
    ev.add_argument("--split", default="test", choices=["train", "val", "test", "all"])
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--predictor", help="predictor file (default: the configured or shipped one)")
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
    t.set_defaults(func=cmd_train)
    return p


def main(argv: list[str] | None = None) -> int:
    import faulthandler

    faulthandler.enable()  # a crash in native code prints where it happened, not only "Segmentation fault"
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        missing = missing_extras(EXTRAS_OF_COMMAND.get(args.command, ()))
        if missing:
            raise MissingExtraError(f"`hera {args.command}` needs libraries that this install leaves out: "
                                    f"pip install 'hera-core[{','.join(missing)}]'")
        return args.func(args)
    except HeraError as exc:  # a user's error, one line; anything else is a bug: its traceback shows
        print(f"hera: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hera: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
