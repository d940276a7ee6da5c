"""What the proxy costs on the cloud path: direct vs `hera serve` vs LiteLLM's proxy, and the
floor: a bare aiohttp forwarder (bench/forwarder.py), what any Python proxy's HTTP hop adds here.

All three talk to the same fast scripted upstream (tests/fake_upstream.py) in a process of its
own on 127.0.0.1; each proxy runs in its own process too; the load comes from this process
(aiohttp), at 1 and 64 concurrent clients. `hera serve` gets model "hera" with
`X-Hera-Policy: cloud-only`: the routing decision, the ledger write (SQLite, committed per
request) and the metrics are included; the SLM prefill that scores predictor-routed steps is not
(it is measured in bench/test_kvcache.py). LiteLLM runs from its own virtualenv (.venv-litellm,
made by `make bench`) with telemetry off; its test is skipped when that is missing.

The scripted upstream and LiteLLM are peers (bench/support.py): waited on until ready, restarted
once if they die, skipped with the reason if they die again. `hera serve` is not: its failure fails
the benchmark. The sides of one client count run back to back (INTERLEAVE_PAIRS).

extra_info: p50_ms, p99_ms, rps. `make bench-compare` checks hera's p50 at 1 client and its rps at
64 clients against direct's in the same run (bench/compare.py).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.support import Peer, PeerDied, sized
from hera_core.serving.assembly import free_port
from tests.processes import wait_for_http

ROOT = Path(__file__).resolve().parent.parent
LITELLM = ROOT / ".venv-litellm" / "bin" / "litellm"
REQUESTS = sized({1: 1000, 64: 64 * 40}, {1: 20, 64: 64 * 2})  # 1 client: 1,000 for a steady p50
WARMUP = sized(20, 5)
INTERLEAVE_PAIRS = True  # bench/conftest.py: direct[c1], hera[c1], litellm[c1], then the c64 cases
KEY = "sk-bench-0123456789abcdef"  # both proxies check a client key, as deployed
AUTH = {"Authorization": f"Bearer {KEY}"}
BODY = {"model": "fake-model", "max_tokens": 8, "messages": [{"role": "user", "content": "ping"}]}


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """The scripted upstream (a peer; it answers POSTs only, so any HTTP answer means ready)."""
    log = tmp_path_factory.mktemp("upstream") / "upstream.log"
    peer = Peer("scripted upstream", lambda port: [sys.executable, "-m", "tests.fake_upstream", "--port", str(port)],
                "/v1/chat/completions", log, ready=lambda status, _: status > 0, cwd=ROOT, timeout_s=60).start()
    yield peer
    peer.stop()


@pytest.fixture(scope="module")
def hera(upstream, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hera")
    port = free_port()
    cfg = tmp / "hera.toml"
    cfg.write_text(f'ledger_path = "{tmp / "ledger.sqlite"}"\n[local]\nmodel = "smollm2-135m"\nn_ctx = 1024\n'
                   f'[cloud]\nbase_url = "{upstream.url}/v1"\nmodel = "fake-model"\n'
                   f'[server]\nport = {port}\nmax_concurrency = 4096\napi_keys = ["{KEY}"]\n')
    proc = subprocess.Popen([sys.executable, "-m", "hera_core.cli", "--config", str(cfg), "serve"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for_http(f"http://127.0.0.1:{port}/healthz", proc)  # raises with its stderr if it dies: a failure
    yield f"http://127.0.0.1:{port}/v1"
    proc.terminate()
    proc.wait()


@pytest.fixture(scope="module")
def forwarder(upstream, tmp_path_factory):
    """The floor (a peer): a bare aiohttp forwarder to the same upstream."""
    log = tmp_path_factory.mktemp("forwarder") / "forwarder.log"
    peer = Peer("bare forwarder", lambda port: [sys.executable, "-m", "bench.forwarder", "--port", str(port),
                                                "--upstream", upstream.url],
                "/healthz", log, cwd=ROOT, timeout_s=60).start()
    yield peer
    peer.stop()


@pytest.fixture(scope="module")
def litellm(upstream, tmp_path_factory):
    if not LITELLM.exists():
        pytest.skip("LiteLLM is not installed (make bench creates .venv-litellm)")
    tmp = tmp_path_factory.mktemp("litellm")
    cfg = tmp / "litellm.yaml"
    cfg.write_text("model_list:\n  - model_name: fake-model\n    litellm_params:\n      model: openai/fake-model\n"
                   f"      api_base: {upstream.url}/v1\n      api_key: sk-fake\n"
                   "litellm_settings:\n  telemetry: false\n  drop_params: true\n")
    env = {**os.environ, "LITELLM_MASTER_KEY": KEY, "LITELLM_TELEMETRY": "False", "LITELLM_LOG": "ERROR",
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    peer = Peer("LiteLLM proxy", lambda port: [str(LITELLM), "--config", str(cfg), "--port", str(port),
                                               "--num_workers", "1"],
                "/health/liveliness", tmp / "litellm.log", env=env, cwd=tmp, timeout_s=180).start()
    yield peer
    peer.stop()


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
            for _ in range(WARMUP):  # warm-up: connections, caches, lazy imports
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


def _bench_peer(benchmark, peer: Peer, clients, body, headers=None):
    """A peer's side: a peer that dies or answers errors under the load is restarted and measured
    again, once (bench/support.py)."""
    def measure(url: str) -> dict:
        result = load(url + "/v1", clients, body, headers or {})
        if result["failures"]:
            raise PeerDied(f"{result['failures']} of {result['requests']} requests failed")
        return result

    result = {}
    benchmark.pedantic(lambda: result.update(peer.run(measure)), rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    print(result)


@pytest.mark.parametrize("clients", [1, 64], ids=["c1", "c64"])
def test_proxy_direct(benchmark, upstream, clients):
    """The client calls the upstream itself: the baseline."""
    _bench_peer(benchmark, upstream, clients, BODY)


@pytest.mark.parametrize("clients", [1, 64], ids=["c1", "c64"])
def test_proxy_hera(benchmark, hera, clients):
    """Through `hera serve`: routing decision (policy), ledger row and metrics per request."""
    _bench(benchmark, hera, clients, {**BODY, "model": "hera"}, {"X-Hera-Policy": "cloud-only", **AUTH})


@pytest.mark.parametrize("clients", [1, 64], ids=["c1", "c64"])
def test_proxy_forwarder(benchmark, forwarder, clients):
    """Through a bare aiohttp forwarder: the HTTP hop alone, HERA's floor."""
    _bench_peer(benchmark, forwarder, clients, BODY)


@pytest.mark.parametrize("clients", [1, 64], ids=["c1", "c64"])
def test_proxy_litellm(benchmark, litellm, clients):
    """Through LiteLLM's proxy (one worker, telemetry off)."""
    _bench_peer(benchmark, litellm, clients, BODY, AUTH)
