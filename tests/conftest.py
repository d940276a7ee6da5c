"""Shared fixtures: real models, a real cloud stand-in over HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import hypothesis  # noqa: F401 - imported early: its plugin importing it at session end trips a
import pytest       # CPython 3.11.7 AST bug under pytest's rewriter ("recursion depth mismatch")

from hera_core.install.models import model_path
from hera_core.serving.assembly import free_port
from tests.processes import wait_for_http

TINY = "smollm2-135m"  # plumbing tests: fast, real


def pytest_collection_finish(session):
    """The run starts with the self-test: llama.cpp's first decode runs in a child process, so a
    native crash (an instruction set this CPU lacks, a broken kernel) stops the run here with its
    message and fix, instead of killing pytest mid-run and hiding every other result. Only where a
    collected test uses the model (the GPU checks alone, on a machine without it, need no llama.cpp)."""
    from hera_core.install.doctor import decode_self_test

    if not any("tiny_model_path" in getattr(item, "fixturenames", ()) for item in session.items):
        return
    try:
        path = model_path(TINY)
    except Exception as exc:  # noqa: BLE001 - the message says how to install it
        pytest.exit(f"{exc} (make test runs `hera models ensure {TINY}`)", returncode=3)
    check = decode_self_test(path)
    if not check.ok:
        pytest.exit(f"llama.cpp self-test failed: {check.detail}; fix: {check.fix}", returncode=3)


@pytest.fixture(scope="session")
def tiny_model_path() -> Path:
    try:
        return model_path(TINY)
    except Exception as exc:  # noqa: BLE001 - the message says how to install it
        pytest.fail(f"{exc} (make test runs `hera models ensure {TINY}`)")


@pytest.fixture(scope="session")
def cloud_url(tiny_model_path) -> str:
    """`hera cloud-sim` serving SmolLM2 on a free loopback port for the whole session."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "hera_core.cli", "cloud-sim", "--model", TINY,
                             "--port", str(port), "--threads", "1", "--n-ctx", "2048"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_http(f"http://127.0.0.1:{port}/healthz", proc)
    yield f"http://127.0.0.1:{port}/v1"
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_path):
    from hera_core.backends.llamacpp import LlamaCppEngine

    engine = LlamaCppEngine(tiny_model_path, name=TINY, n_ctx=2048, n_threads=1)
    yield engine
    asyncio.run(engine.close())


def run(coro):
    """Run a coroutine on a fresh event loop (tests are plain functions)."""
    return asyncio.run(coro)


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    """An empty HERA cache folder for this test; real models stay where `make` put them."""
    monkeypatch.setenv("HERA_LEDGER_PATH", str(tmp_path / "ledger.sqlite"))
    return tmp_path


class ServerThread:
    """An aiohttp app served on a free loopback port from an event loop in a background thread,
    so that synchronous clients (the openai SDK) can talk to it from the test."""

    def __init__(self, make_app) -> None:
        import threading

        from aiohttp import web

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.port = free_port()

        async def start():
            from hera_core.serving.http import RUNNER_OPTIONS

            app = await make_app() if asyncio.iscoroutinefunction(make_app) else make_app()
            self.runner = web.AppRunner(app, **RUNNER_OPTIONS)  # as `hera serve` runs it
            await self.runner.setup()
            await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

        self.call(start())
        self.url = f"http://127.0.0.1:{self.port}"

    def call(self, coro, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.call(self.runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


def split_server(local, cloud, tmp_path, *, max_tokens: int, api_key: str) -> ServerThread:
    """`hera serve` over a runtime whose first step goes to `cloud` and later steps to `local`
    (random predictor, kappa split at step 1), with a SQLite ledger and one API key; `srv.rt` and
    `srv.ledger` are the runtime and ledger. `stop_server` closes all three."""
    from hera_core.config import load_settings
    from hera_core.routing.ledger import Ledger
    from hera_core.routing.predictor import Kappa
    from hera_core.routing.runtime import Runtime
    from hera_core.serving.server import create_app
    from tests.factories import random_predictor

    settings = load_settings(env={}, overrides={"max_tokens": max_tokens, "server.api_keys": [api_key]})
    ledger = Ledger(tmp_path / "ledger.sqlite")
    split = Kappa(base=1.01, per_step=-1.02, max_steps=1)  # step 0 -> cloud, later steps -> local
    holder = {}

    def make_app():
        holder["rt"] = Runtime(local, cloud, random_predictor(kappa=split), ledger, settings.prices, run="serve",
                               max_tokens=max_tokens)
        return create_app(settings, runtime=holder["rt"])

    srv = ServerThread(make_app)
    srv.ledger, srv.rt = ledger, holder["rt"]
    return srv


def stop_server(srv: ServerThread) -> None:
    srv.call(srv.rt.cloud.close())
    srv.close()
    srv.ledger.close()
