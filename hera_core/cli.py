"""The `hera` command line. Errors print one line that names the fix (exit status 2)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path

from hera_core.errors import HeraError, MissingExtraError, SelfTestFailed
from hera_core.cli_offline import _settings, add_offline_parsers

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
    """The `hera` command line: the serving side here, the offline subcommands from cli_offline."""
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

    add_offline_parsers(sub)
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
