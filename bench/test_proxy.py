"""What the proxy costs on the cloud path: direct vs `hera serve` vs LiteLLM's proxy.

All three talk to the same fast scripted upstream (tests/fake_upstream.py) in a process of its
own on 127.0.0.1; each proxy runs in its own process too; the load comes from this process
(aiohttp), at 1 and 64 concurrent clients. `hera serve` gets model "hera" with
`X-Hera-Policy: cloud-only`: the routing decision, the ledger write (SQLite, committed per
request) and the metrics are included; the SLM prefill that scores predictor-routed steps is not
(it is measured in bench/test_kvcache.py). LiteLLM runs from its own virtualenv (.venv-litellm,
made by `make bench`) with telemetry off; its test is skipped when that is missing.

extra_info: p50_ms, p99_ms, rps.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hera_core.serving.assembly import free_port
from tests.processes import wait_for_http

ROOT = Path(__file__).resolve().parent.parent
LITELLM = ROOT / ".venv-litellm" / "bin" / "litellm"
REQUESTS = {1: 400, 64: 64 * 40}
KEY = "sk-bench-0123456789abcdef"  # both proxies check a client key, as deployed
AUTH = {"Authorization": f"Bearer {KEY}"}
BODY = {"model": "fake-model", "max_tokens": 8, "messages": [{"role": "user", "content": "ping"}]}


@pytest.fixture(scope="module")
def upstream():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tests.fake_upstream", "--port", str(port)], cwd=ROOT)
    wait_for_http(f"http://127.0.0.1:{port}/v1/chat/completions", proc)
    yield f"http://127.0.0.1:{port}/v1"
    proc.terminate()
    proc.wait()


@pytest.fixture(scope="module")
def hera(upstream, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hera")
    port = free_port()
    cfg = tmp / "hera.toml"
    cfg.write_text(f'ledger_path = "{tmp / "ledger.sqlite"}"\n[local]\nmodel = "smollm2-135m"\nn_ctx = 1024\n'
                   f'[cloud]\nbase_url = "{upstream}"\nmodel = "fake-model"\n'
                   f'[server]\nport = {port}\nmax_concurrency = 4096\napi_keys = ["{KEY}"]\n')
    proc = subprocess.Popen([sys.executable, "-m", "hera_core.cli", "--config", str(cfg), "serve"], cwd=ROOT,
                            stdout=subprocess.DEVNULL)
    wait_for_http(f"http://127.0.0.1:{port}/healthz", proc)
    yield f"http://127.0.0.1:{port}/v1"
    proc.terminate()
    proc.wait()


@pytest.fixture(scope="module")
def litellm(upstream, tmp_path_factory):
    if not LITELLM.exists():
        pytest.skip("LiteLLM is not installed (make bench creates .venv-litellm)")
    tmp = tmp_path_factory.mktemp("litellm")
    port = free_port()
    cfg = tmp / "litellm.yaml"
    cfg.write_text("model_list:\n  - model_name: fake-model\n    litellm_params:\n      model: openai/fake-model\n"
                   f"      api_base: {upstream}\n      api_key: sk-fake\n"
                   "litellm_settings:\n  telemetry: false\n  drop_params: true\n")
    env = {**os.environ, "LITELLM_MASTER_KEY": KEY, "LITELLM_TELEMETRY": "False", "LITELLM_LOG": "ERROR", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([str(LITELLM), "--config", str(cfg), "--port", str(port), "--num_workers", "1"],
                            cwd=tmp, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_http(f"http://127.0.0.1:{port}/health/liveliness", proc, timeout_s=180)
    yield f"http://127.0.0.1:{port}/v1"
    proc.terminate()
    proc.wait()


def load(url: str, clients: int, body: dict, headers: dict) -> dict:
    import aiohttp

    total = REQUESTS[clients]
    latencies: list[float] = []
    failures = 0

    async def client(n: int, http) -> None:
        nonlocal failures
        for _ in range(n):
            t0 = time.perf_counter()
            async with http.post(url + "/chat/completions", json=body, headers=headers) as r:
                await r.read()
                if r.status != 200:
                    failures += 1
            latencies.append(time.perf_counter() - t0)

    async def go() -> float:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            for _ in range(20):  # warm-up: connections, caches, lazy imports
                async with http.post(url + "/chat/completions", json=body, headers=headers) as r:
                    await r.read()
            t0 = time.perf_counter()
            await asyncio.gather(*(client(total // clients, http) for _ in range(clients)))
            return time.perf_counter() - t0

    wall = asyncio.run(go())
    latencies.sort()
    n = len(latencies)
    return {"p50_ms": round(1000 * latencies[n // 2], 3), "p99_ms": round(1000 * latencies[int(n * 0.99)], 3),
            "rps": round(n / wall, 1), "requests": n, "failures": failures}


def _bench(benchmark, url, clients, body, headers=None):
    result = {}
    benchmark.pedantic(lambda: result.update(load(url, clients, body, headers or {})), rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    print(result)
    assert result["failures"] == 0


@pytest.mark.parametrize("clients", [1, 64], ids=["c1", "c64"])
def test_proxy_direct(benchmark, upstream, clients):
    """The client calls the upstream itself: the baseline."""
    _bench(benchmark, upstream, clients, BODY)


@pytest.mark.parametrize("clients", [1, 64], ids=["c1", "c64"])
def test_proxy_hera(benchmark, hera, clients):
    """Through `hera serve`: routing decision (policy), ledger row and metrics per request."""
    _bench(benchmark, hera, clients, {**BODY, "model": "hera"}, {"X-Hera-Policy": "cloud-only", **AUTH})


@pytest.mark.parametrize("clients", [1, 64], ids=["c1", "c64"])
def test_proxy_litellm(benchmark, litellm, clients):
    """Through LiteLLM's proxy (one worker, telemetry off)."""
    _bench(benchmark, litellm, clients, BODY, AUTH)
