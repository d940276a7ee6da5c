"""The `hera` command line. Errors print one line that names the fix (exit status 2)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path


def _settings(args):
    from .config import load_settings

    overrides = {}
    if getattr(args, "local_model", None):
        overrides["local.model"] = args.local_model
    if getattr(args, "cloud_model", None):
        overrides["cloud.model"] = args.cloud_model
    return load_settings(args.config, overrides)


def cmd_models(args) -> int:
    from .models import MODELS, ensure, is_installed

    if args.action == "list":
        for spec in MODELS.values():
            state = "installed" if is_installed(spec) else "missing"
            print(f"{spec.name:22} {spec.size / 1e6:8.1f} MB  {state:9}  {spec.description}")
        return 0
    for name in args.names or ["smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"]:
        print(f"{name}: {ensure(name, progress=sys.stderr.isatty())}")
    return 0


def cmd_cloud_sim(args) -> int:
    from aiohttp import web

    from .cloud_sim import create_app
    from .engines.llamacpp import LlamaCppEngine
    from .models import model_path

    engine = LlamaCppEngine(model_path(args.model), name=args.model, n_ctx=args.n_ctx, n_threads=args.threads)
    web.run_app(create_app(engine), host=args.host, port=args.port, print=None, access_log=None)
    return 0


def cmd_serve(args) -> int:
    from aiohttp import web

    from .server import create_app

    overrides = {}
    if args.host:
        overrides["server.host"] = args.host
    if args.port is not None:
        overrides["server.port"] = args.port
    from .config import load_settings

    settings = load_settings(args.config, overrides)
    s = settings.server
    print(f"hera serve: http://{s.host}:{s.port}/v1 (model 'hera' is routed; others pass through)", flush=True)
    web.run_app(create_app(settings), host=s.host, port=s.port, print=None, access_log=None)
    return 0


def cmd_demo(args) -> int:
    from .demo import render, run_demo

    result = asyncio.run(run_demo(_settings(args), args.tasks, seed=args.seed, progress=not args.json,
                                  use_cache=not args.no_cache))
    if args.json:
        print(json.dumps(result))
    else:
        render(result)
    return 0


def cmd_profile(args) -> int:
    from .profiling import profile
    from .stack import open_engines
    from .workloads import make_tasks

    settings = _settings(args)
    families = args.families.split(",") if args.families else None
    tasks = make_tasks(families, per_family=args.tasks_per_family, seed=args.seed, split=args.split)

    async def go():
        async with open_engines(settings, use_cache=True) as (local, cloud):
            return await profile(tasks, local, cloud, Path(args.out), seed=args.seed)

    print(f"traces: {asyncio.run(go())}")
    return 0


def cmd_train(args) -> int:
    from .profiling import load_traces
    from .training import train

    traces = [t for path in args.traces for t in load_traces(path)]
    client = None
    if args.dask:
        from dask.distributed import Client

        client = Client(args.dask)
    try:
        predictor, report = train(traces, max_drop=args.max_drop, dask_client=client,
                                  meta={"traces": [Path(p).name for p in args.traces]})
    finally:
        if client is not None:
            client.close()
    predictor.save(args.out)
    print(json.dumps(report, indent=1))
    print(f"predictor: {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hera", description="Route AI-agent steps between a local SLM and a cloud LLM.")
    p.add_argument("--config", help="TOML settings file (see README: Configuration)")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("models", help="list or install the GGUF models")
    m.add_argument("action", choices=["list", "ensure"])
    m.add_argument("names", nargs="*", help="model names (default: all)")
    m.set_defaults(func=cmd_models)

    c = sub.add_parser("cloud-sim", help="serve a GGUF model over an OpenAI-compatible API (stand-in cloud)")
    c.add_argument("--model", default="qwen2.5-coder-1.5b")
    c.add_argument("--host", default="127.0.0.1")
    c.add_argument("--port", type=int, default=8077)
    c.add_argument("--threads", type=int, default=1)
    c.add_argument("--n-ctx", type=int, default=4096)
    c.set_defaults(func=cmd_cloud_sim)

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
    pr.add_argument("--split", default="train", choices=["train", "val", "test"])
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--local-model")
    pr.add_argument("--cloud-model")
    pr.set_defaults(func=cmd_profile)

    t = sub.add_parser("train", help="fit the predictor on traces and calibrate kappa(step)")
    t.add_argument("traces", nargs="+", help="traces.jsonl files from `hera profile`")
    t.add_argument("--out", default="predictor.json")
    t.add_argument("--max-drop", type=float, default=0.03, help="accuracy drop allowed vs All-LLM (default 0.03)")
    t.add_argument("--dask", metavar="ADDRESS", help="train on an existing Dask cluster")
    t.set_defaults(func=cmd_train)
    return p


def main(argv: list[str] | None = None) -> int:
    from .errors import HeraError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except (HeraError, ValueError, LookupError) as exc:
        print(f"hera: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hera: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
