"""Shared fixtures: real models, a real cloud stand-in over HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from hera_core.models import model_path
from hera_core.stack import free_port

TINY = "smollm2-135m"  # plumbing tests: fast, real


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
    deadline = time.time() + 60
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail("cloud-sim did not start")
        time.sleep(0.2)
    yield f"http://127.0.0.1:{port}/v1"
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_path):
    from hera_core.engines.llamacpp import LlamaCppEngine

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
