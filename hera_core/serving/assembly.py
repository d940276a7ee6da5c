"""Assemble a running HERA from settings: models, engines, cloud (real or simulated), ledger,
budget, runtime.

`open_runtime(settings)` is an async context manager. Without cloud.base_url it starts
`hera cloud-sim` as a child process on a free 127.0.0.1 port and stops it on exit, so the demo
and the tests talk to a real model over real HTTP.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp

from hera_core.checks.sandbox import default_sandbox
from hera_core.config import HeraSettings
from hera_core.backends.cloud import CloudEngine
from hera_core.backends.llamacpp import LlamaCppEngine
from hera_core.errors import CloudUnavailableError, ConfigError
from hera_core.routing.budget import Budget
from hera_core.routing.ledger import Ledger
from hera_core.install.models import model_path
from hera_core.routing.predictor import Predictor
from hera_core.routing.runtime import Runtime

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@asynccontextmanager
async def cloud_sim(model: str, *, threads: int = 1, n_ctx: int = 4096, cache_dir: Path | None = None,
                    startup_timeout_s: float = 120.0) -> AsyncIterator[str]:
    """Run `hera cloud-sim` in a child process; yields its base URL (…/v1)."""
    model_path(model, cache_dir)  # fail fast, in this process, with the install hint
    port = free_port()
    env = dict(os.environ)
    if cache_dir is not None:
        env["HERA_CACHE_DIR"] = str(cache_dir)
    proc = subprocess.Popen([sys.executable, "-m", "hera_core.cli", "cloud-sim", "--model", model,
                             "--port", str(port), "--threads", str(threads), "--n-ctx", str(n_ctx)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        async with aiohttp.ClientSession() as http:
            deadline = asyncio.get_running_loop().time() + startup_timeout_s
            while True:
                if proc.poll() is not None:
                    err = proc.stderr.read().decode(errors="replace").strip().splitlines()
                    raise CloudUnavailableError(f"cloud-sim exited: {err[-1] if err else proc.returncode}")
                try:
                    async with http.get(f"http://127.0.0.1:{port}/healthz") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                if asyncio.get_running_loop().time() > deadline:
                    raise CloudUnavailableError(f"cloud-sim did not start within {startup_timeout_s:.0f}s")
                await asyncio.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()


@asynccontextmanager
async def open_engines(settings: HeraSettings, *, use_cache: bool = False):
    """(local, cloud) engines from settings. `use_cache` answers repeated greedy requests from the
    completion cache (profiling reruns, evaluation of many policies)."""
    if settings.local.engine == "llamacpp":
        model_path(settings.local.model, settings.cache_dir)  # a missing model fails before the cloud starts
    async with _cloud_base_url(settings) as base_url:
        if settings.local.engine == "tensorrt":
            from hera_core.backends.tensorrt import TensorRTLLMEngine

            local = TensorRTLLMEngine.from_settings(settings)
        else:
            local = LlamaCppEngine.from_settings(settings)
        cloud = CloudEngine.from_settings(settings, base_url=base_url)
        cache = None
        if use_cache:  # offline runs only (profiling, the demo); the server never asks for it
            from hera_core.backends.caching import CachingEngine, CompletionCache

            cache = CompletionCache(settings.cache_dir / "completions.sqlite")
            local, cloud = CachingEngine(local, cache), CachingEngine(cloud, cache)
        try:
            yield local, cloud
        finally:
            await local.close()
            await cloud.close()
            if cache is not None:
                cache.close()


def _installed(module: str) -> bool:
    """Whether `module` can be imported here (an extra of hera-core may leave it out)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


def open_ledger(settings: HeraSettings):
    """The ledger the settings name: PostgreSQL (`ledger_url`, shared by a fleet) or the SQLite file."""
    if settings.ledger_url is not None:
        if not (_installed("psycopg") and _installed("psycopg_pool")):
            raise ConfigError("ledger_url names a PostgreSQL ledger, whose driver this install leaves out: "
                              "pip install 'hera-core[fleet]'")
        from hera_core.routing.ledger_pg import PgLedger

        return PgLedger(settings.ledger_url.get_secret_value(), node=settings.node_id,
                        spool_path=settings.cache_dir / "ledger-spool.jsonl")
    return Ledger(settings.resolved_ledger_path(), durability=settings.ledger_durability)


def _log_sandbox() -> None:
    """Once at start: whether the drafts' programs can run isolated (probed now, not on the first step)."""
    status = default_sandbox().status
    if status.mechanism == "bubblewrap":
        log.info("sandbox for model-written code: %s", status.detail)
    else:
        log.warning("sandbox for model-written code: %s; `hera doctor` says more", status.detail)


@asynccontextmanager
async def open_runtime(settings: HeraSettings, *, run: str = "default", predictor: Predictor | None = None,
                       use_cache: bool = False) -> AsyncIterator[Runtime]:
    """A Runtime over the configured local SLM and cloud, booking into the configured ledger."""
    if settings.local.engine == "llamacpp":
        model_path(settings.local.model, settings.cache_dir)  # a missing model is the first thing to fix
    predictor = predictor or Predictor.load(settings.policy.predictor_path)
    learner = open_learner(settings, predictor)
    if learner is not None:
        predictor = learner.predictor()  # the version in use (v0: the one configured)
    _log_sandbox()
    async with open_engines(settings, use_cache=use_cache) as (local, cloud):
        ledger = open_ledger(settings)
        try:
            rt = Runtime(local, cloud, predictor, ledger, settings.prices, budget=budget_from(settings, ledger),
                         policy=settings.policy, run=run, max_tokens=settings.max_tokens,
                         fallback=settings.cloud.fallback)
            if learner is not None:
                attach_learning(rt, learner)
            try:
                yield rt
            finally:
                if rt.learning is not None:
                    await rt.learning.close()
        finally:
            if learner is not None:
                learner.close()
            ledger.close()


def learning_folder(settings: HeraSettings) -> Path:
    """Where the learning loop keeps its trace store and predictor versions (`hera learn --folder`)."""
    return settings.learning.folder or settings.cache_dir / "learning"


def open_learner(settings: HeraSettings, initial: Predictor):
    """The learning loop's state (docs/learning.md) when the settings turn it on (learning.shadow, or
    learning.retrain_every > 0), else None. Retraining in the server needs XGBoost (the [learn]
    extra): without it this fails at start, not at the first retrain."""
    ls = settings.learning
    if not ls.shadow and not ls.retrain_every:
        return None
    if ls.retrain_every and not _installed("xgboost"):
        raise ConfigError("learning.retrain_every needs XGBoost, which this install leaves out: "
                          "pip install 'hera-core[learn]' (or set learning.retrain_every = 0)")
    from hera_core.routing.learning import LiveLearner

    store = None
    if settings.ledger_url is not None:  # a fleet: every node traces into, and learns from, the shared database
        from hera_core.routing.traces_pg import PgTraceStore

        store = PgTraceStore(settings.ledger_url.get_secret_value(), node=settings.node_id,
                             max_rows=ls.max_trace_rows)
    return LiveLearner(ls, learning_folder(settings), initial, sandbox=default_sandbox(), store=store)


def attach_learning(rt: Runtime, learner) -> None:
    """Shadow drafts, audits and predictor swaps beside the runtime (hera_core.routing.shadow)."""
    from hera_core.routing.shadow import TrafficLearning

    def swap(predictor: Predictor, why: str) -> None:
        rt.predictor = predictor  # between requests: a step in flight keeps the version that scored it

    rt.learning = TrafficLearning(learner, rt.local, rt.cloud, swap, book=rt.book_learning)
    log.info("learning from served traffic: predictor %s, trace store %s (%d steps)",
             learner.versions.current, learner.store.path, learner.store.count())


def budget_from(settings: HeraSettings, ledger: Ledger) -> Budget | None:
    """The cloud spend caps of the settings, seeded from the ledger's spend (None: no cap set)."""
    s = settings.server
    if s.session_budget_usd is None and s.daily_budget_usd is None:
        return None
    if settings.ledger_url is not None:  # a fleet: the caps hold across every node of the shared ledger
        from hera_core.routing.ledger_pg import PgBudget

        return PgBudget(ledger, per_session_usd=s.session_budget_usd, per_day_usd=s.daily_budget_usd,
                        action=s.budget_action, hold_ttl_s=settings.cloud.timeout_s + 60)
    return Budget(per_session_usd=s.session_budget_usd, per_day_usd=s.daily_budget_usd, action=s.budget_action,
                  ledger=ledger)


@asynccontextmanager
async def _cloud_base_url(settings: HeraSettings) -> AsyncIterator[str]:
    if settings.cloud.base_url:
        yield settings.cloud.base_url
        return
    async with cloud_sim(settings.cloud.model, threads=settings.cloud.sim_threads,
                         n_ctx=settings.local.n_ctx, cache_dir=settings.cache_dir) as url:
        yield url
