"""Continuous batching: concurrent agent sessions on the local engine, against the same engine one
sequence per decode and against llama.cpp's own server (`llama-server --parallel 8`, continuous
batching), all on the same model, threads and cores, in one run.

Each session: a ~300-token prompt of its own, then 128 greedy tokens (the prompt asks for a long
count, so the answers run to the limit). Qwen2.5-Coder-0.5B-Instruct by default
(HERA_BENCH_MODEL names another manifest model), HERA_BENCH_THREADS threads (default 2).

The peer is built here from the llama.cpp sources vendored in the pinned llama-cpp-python source
package (the same llama.cpp as the engine), with the CPU flags HERA builds its own llama.cpp
with, into <cache_dir>/peers/; nothing of it is committed. Without a compiler, or without the
source package, the peer's cases skip with the reason.

llama-server is a peer (bench/support.py): waited on until its model is loaded, restarted once if
it dies or drops a connection, the case skipped with the reason and its log's tail if it does so
again. Smoke mode (HERA_BENCH_SMOKE=1): SmolLM2-135M on 1 thread, 8 tokens, 2 sessions where 8
were, short prompts, and the llama-server cases only where the peer is already built (building it
takes minutes).

extra_info: tokens_per_s (generated tokens of all sessions / wall time), ttft_p50_s, ttft_p99_s,
generated_tokens, and `same_as_serial` (greedy outputs equal to one-sequence decoding).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import pytest

from bench.support import Peer, PeerDied, sized, skip_in_smoke
from hera_core.install.models import model_path

MODEL = os.environ.get("HERA_BENCH_MODEL", sized("qwen2.5-coder-0.5b", "smollm2-135m"))
THREADS = int(os.environ.get("HERA_BENCH_THREADS", sized("2", "1")))  # smoke: 1 (a busy CI machine)
TOKENS = sized(128, 8)
MANY = sized(8, 2)  # "8 sessions" (s8, the prefill and prompt-chunk cases)
PROMPT_WORDS = sized(230, 30)  # a session's prompt: ~300 tokens with the template (smoke: ~60)
LONG_REPEATS = sized(50, 4)  # the long prompt: ~1,900 tokens (smoke: ~200)
N_CTX = 1024  # per session: the prompt and the answer
LLAMA_CPP_PYTHON = "0.3.36"  # pinned in pyproject.toml: the peer is built from the same llama.cpp
NOTES = ("agent tool plan step value result check list table file query answer model token cache route "
         "ledger budget edge cloud device session prefix batch decode").split()
_serial_outputs: dict[int, list[str]] = {}


def session_prompt(i: int) -> list[dict]:
    words = " ".join(NOTES[(i * 7 + k) % len(NOTES)] for k in range(PROMPT_WORDS))
    return [{"role": "system", "content": f"You are session {i}. Notes: {words}"},
            {"role": "user", "content": f"List every integer from {i * 1000 + 1} to {i * 1000 + 300}, "
                                        "one per line, with no other text."}]


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def run_engine(sessions: int, batching: bool, prefill_chunk: int = 256) -> dict:
    from hera_core.backends.llamacpp import LlamaCppEngine

    engine = LlamaCppEngine(model_path(MODEL), name=MODEL, n_ctx=N_CTX, n_slots=max(sessions, 1), n_threads=THREADS,
                            batching=batching, prefill_chunk=prefill_chunk)

    async def one(i: int):
        t0, first = time.perf_counter(), []
        gen = await engine.generate(session_prompt(i), max_tokens=TOKENS,
                                    on_text=lambda d: first or first.append(time.perf_counter() - t0))
        return gen, first[0] if first else gen.latency_s

    async def go():
        t0 = time.perf_counter()
        results = await asyncio.gather(*[one(i) for i in range(sessions)])
        wall = time.perf_counter() - t0
        await engine.close()
        return results, wall

    results, wall = asyncio.run(go())
    texts = [g.text for g, _ in results]
    generated = sum(g.completion_tokens for g, _ in results)
    ttfts = [t for _, t in results]
    out = {"tokens_per_s": generated / wall, "ttft_p50_s": statistics.median(ttfts),
           "ttft_p99_s": percentile(ttfts, 0.99), "generated_tokens": generated, "wall_s": wall}
    if not batching:
        _serial_outputs[sessions] = texts
    elif sessions in _serial_outputs:
        out["same_as_serial"] = sum(a == b for a, b in zip(texts, _serial_outputs[sessions])) / sessions
    return out


# --- the peer: llama.cpp's own server ------------------------------------------------------------
def llama_server() -> Path:
    """Build (once) llama-server from the llama.cpp vendored in llama-cpp-python's source package."""
    from hera_core.config import load_settings
    from hera_core.install.llama_build import cmake_args

    out = load_settings().cache_dir / "peers" / f"llama-server-{LLAMA_CPP_PYTHON}"
    if out.exists():
        return out
    skip_in_smoke(f"llama-server is not built yet ({out.name}; building it takes minutes)")
    if shutil.which("cmake") is None or shutil.which("c++") is None:
        pytest.skip("the llama-server peer needs cmake and a C++ compiler")
    with tempfile.TemporaryDirectory() as tmp:
        got = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                              "--no-build-isolation", "-q",
                              "-d", tmp, f"llama-cpp-python=={LLAMA_CPP_PYTHON}"], capture_output=True, text=True)
        sdists = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if got.returncode != 0 or not sdists:
            pytest.skip(f"cannot fetch the llama-cpp-python source package: {got.stderr.strip()[-200:]}")
        with tarfile.open(sdists[0]) as tar:
            tar.extractall(tmp, filter="data")
        src = next(Path(tmp).glob("llama_cpp_python-*/vendor/llama.cpp"))
        build = Path(tmp) / "build"
        flags = [a for a in cmake_args().split() if a.startswith("-D")]
        subprocess.run(["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
                        "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                        "-DBUILD_SHARED_LIBS=OFF", *flags], check=True, capture_output=True)
        subprocess.run(["cmake", "--build", str(build), "--target", "llama-server", "-j", str(os.cpu_count() or 2)],
                       check=True, capture_output=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(build / "bin" / "llama-server", out)
    return out


def _server_ready(status: int, body: bytes) -> bool:
    """Its /health answers before the model is loaded ("Loading model", 503): ready at 200 and "ok"."""
    try:
        return status == 200 and json.loads(body).get("status") == "ok"
    except ValueError:
        return False


def run_llama_server(sessions: int, log: Path) -> dict:
    import aiohttp

    binary = llama_server()
    n = max(sessions, 1)
    peer = Peer("llama-server", lambda port: [
        str(binary), "-m", str(model_path(MODEL)), "--port", str(port), "--host", "127.0.0.1", "--parallel", str(n),
        "-c", str(N_CTX * n), "--threads", str(THREADS), "--threads-batch", str(THREADS), "-fa", "on",
        "--cont-batching", "--no-webui"], "/health", log, ready=_server_ready, timeout_s=120)

    def measure(url: str):
        async def one(http, i: int):
            t0, first, n = time.perf_counter(), None, 0
            body = {"messages": session_prompt(i), "max_tokens": TOKENS, "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True}}
            async with http.post(f"{url}/v1/chat/completions", json=body) as resp:
                if resp.status != 200:
                    raise PeerDied(f"status {resp.status}: {(await resp.text())[:200]}")
                async for raw in resp.content:
                    line = raw.strip()
                    if not line.startswith(b"data:") or line == b"data: [DONE]":
                        continue
                    chunk = json.loads(line[5:])
                    if first is None and any((c.get("delta") or {}).get("content") for c in chunk.get("choices", [])):
                        first = time.perf_counter() - t0
                    n = (chunk.get("usage") or {}).get("completion_tokens", n)
            return n, first if first is not None else time.perf_counter() - t0

        async def go():
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as http:
                await one(http, 99)  # warm-up, as our engines are warmed by loading
                t0 = time.perf_counter()
                results = await asyncio.gather(*[one(http, i) for i in range(sessions)])
                return results, time.perf_counter() - t0

        return asyncio.run(go())

    try:
        peer.start()
        results, wall = peer.run(measure)
    finally:
        peer.stop()
    generated = sum(n for n, _ in results)
    ttfts = [t for _, t in results]
    return {"tokens_per_s": generated / wall, "ttft_p50_s": statistics.median(ttfts),
            "ttft_p99_s": percentile(ttfts, 0.99), "generated_tokens": generated, "wall_s": wall,
            "server_starts": peer.starts}


SESSIONS = [pytest.param(1, id="s1"), pytest.param(MANY, id="s8")]  # smoke: "s8" is 2 sessions


@pytest.fixture(autouse=True)
def _model():
    try:
        model_path(MODEL)
    except Exception as exc:  # noqa: BLE001
        pytest.skip(str(exc))


@pytest.mark.parametrize("sessions", SESSIONS)
def test_sessions_serial(benchmark, sessions):
    benchmark.extra_info.update(benchmark.pedantic(run_engine, args=(sessions, False), rounds=1, iterations=1))


@pytest.mark.parametrize("sessions", SESSIONS)
def test_sessions_batched(benchmark, sessions):
    benchmark.extra_info.update(benchmark.pedantic(run_engine, args=(sessions, True), rounds=1, iterations=1))


@pytest.mark.parametrize("chunk", [0, 64], ids=lambda c: f"chunk{c}")
def test_sessions_batched_prompt_chunk_s8(benchmark, chunk):
    """The batched engine at 8 sessions with other prompt chunks (0: each prompt evaluated whole
    in one step, as before chunking; the default, 256, is test_sessions_batched)."""
    benchmark.extra_info.update(benchmark.pedantic(run_engine, args=(MANY, True, chunk), rounds=1, iterations=1))


@pytest.mark.parametrize("sessions", SESSIONS)
def test_sessions_llama_server(benchmark, sessions, tmp_path):
    log = tmp_path / "llama-server.log"
    benchmark.extra_info.update(benchmark.pedantic(run_llama_server, args=(sessions, log), rounds=1, iterations=1))


# --- n samples of one step (the draft checks' sample agreement; OpenAI's n) ----------------------
def run_samples(k: int, shared: bool) -> dict:
    """k sampled answers to one ~300-token prompt, 128 tokens each: in one call whose samples share
    the prompt's KV and decode together (`shared`), or as k calls one after another."""
    from hera_core.backends.llamacpp import LlamaCppEngine

    engine = LlamaCppEngine(model_path(MODEL), name=MODEL, n_ctx=N_CTX, n_slots=8, n_threads=THREADS)
    prompt = session_prompt(0)

    async def go():
        t0 = time.perf_counter()
        if shared:
            gens = await engine.generate_samples(prompt, k, max_tokens=TOKENS, temperature=0.7, seed=1)
        else:
            gens = [(await engine.generate_samples(prompt, 1, max_tokens=TOKENS, temperature=0.7, seed=i))[0]
                    for i in range(k)]
        wall = time.perf_counter() - t0
        await engine.close()
        return gens, wall

    gens, wall = asyncio.run(go())
    return {"wall_s": wall, "generated_tokens": sum(g.completion_tokens for g in gens),
            "prefill_tokens": engine.stats["prefill_tokens"]}


@pytest.mark.parametrize("k", [1, 3, 5], ids=lambda k: f"k{k}")
def test_samples_shared_prompt(benchmark, k):
    """Wall time of k samples in one call, the prompt evaluated once (k1: the single draft)."""
    info = benchmark.pedantic(run_samples, args=(k, True), rounds=1, iterations=1)
    benchmark.extra_info.update(info)


@pytest.mark.parametrize("k", [3, 5], ids=lambda k: f"k{k}")
def test_samples_one_after_another(benchmark, k):
    """The same k samples as k calls in turn (what a client asking k times would wait)."""
    info = benchmark.pedantic(run_samples, args=(k, False), rounds=1, iterations=1)
    benchmark.extra_info.update(info)


# --- routing prefills of several sessions that arrive together ------------------------------------
def run_prefills(sessions: int, batching: bool) -> dict:
    """Each session's ~300-token history is cached first; then every session's next step (its last
    answer and a new user turn, ~40 new tokens) is prefilled for routing, all at once: with
    batching the queued prefills are evaluated together (shared llama_decode calls), without it
    one after another. extra_info: wall_s for the 8 prefills, new_tokens evaluated."""
    from hera_core.backends.llamacpp import LlamaCppEngine

    engine = LlamaCppEngine(model_path(MODEL), name=MODEL, n_ctx=N_CTX, n_slots=sessions, n_threads=THREADS,
                            batching=batching)
    history = [session_prompt(i) for i in range(sessions)]
    nxt = [h + [{"role": "assistant", "content": f"{i * 1000 + 1}\n{i * 1000 + 2}\n{i * 1000 + 3}"},
                {"role": "user", "content": f"Now list them backwards, from {i * 1000 + 300} down, and stop at "
                                            f"{i * 1000 + 250}; put each on its own line."}]
           for i, h in enumerate(history)]

    async def go():
        for h in history:
            await engine.prefill(h)
        before = engine.stats["prefill_tokens"]
        t0 = time.perf_counter()
        await asyncio.gather(*[engine.prefill(m) for m in nxt])
        wall = time.perf_counter() - t0
        await engine.close()
        return wall, engine.stats["prefill_tokens"] - before

    wall, new_tokens = asyncio.run(go())
    return {"wall_s": wall, "new_tokens": new_tokens, "prefill_batches": engine.stats["prefill_batches"]}


@pytest.mark.parametrize("mode", ["batched", "serial"])
def test_next_step_prefills_s8(benchmark, mode):
    info = benchmark.pedantic(run_prefills, args=(MANY, mode == "batched"), rounds=1, iterations=1)
    benchmark.extra_info.update(info)


# --- a long prompt arriving while other sessions decode --------------------------------------------
def run_long_prompt(prefill_chunk: int, running: int = sized(4, 2)) -> dict:
    """`running` sessions decode 128 tokens each; once they are under way a ~1,900-token prompt
    arrives. extra_info: the longest gap between two tokens of a running session (how long the
    long prompt stalled them), the long prompt's time to first token, and the running sessions'
    aggregate tokens/s."""
    from hera_core.backends.llamacpp import LlamaCppEngine

    engine = LlamaCppEngine(model_path(MODEL), name=MODEL, n_ctx=2 * N_CTX, n_slots=running + 1, n_threads=THREADS,
                            prefill_chunk=prefill_chunk)
    long_prompt = session_prompt(99)
    long_prompt[0] = {"role": "system", "content": long_prompt[0]["content"] + " " + " ".join(NOTES * LONG_REPEATS)}

    async def go():
        stamps: list[list[float]] = [[] for _ in range(running)]
        started = asyncio.Event()

        def on_text(i):
            def note(_):
                stamps[i].append(time.perf_counter())
                if all(stamps):
                    started.set()
            return note

        t0 = time.perf_counter()
        runs = [asyncio.create_task(engine.generate(session_prompt(i), max_tokens=TOKENS, on_text=on_text(i)))
                for i in range(running)]
        await started.wait()
        t_long = time.perf_counter()
        first: list[float] = []
        long = await engine.generate(long_prompt, max_tokens=8,
                                     on_text=lambda _: first or first.append(time.perf_counter() - t_long))
        gens = await asyncio.gather(*runs)
        wall = time.perf_counter() - t0
        await engine.close()
        gaps = [b - a for st in stamps for a, b in zip(st, st[1:]) if b > t_long]
        return {"max_gap_s": max(gaps, default=0.0), "long_prompt_tokens": long.prompt_tokens,
                "long_ttft_s": first[0] if first else long.latency_s,
                "running_tokens_per_s": sum(g.completion_tokens for g in gens) / wall}

    return asyncio.run(go())


@pytest.mark.parametrize("chunk", [0, 256], ids=lambda c: f"chunk{c}")
def test_long_prompt_while_sessions_decode(benchmark, chunk):
    benchmark.extra_info.update(benchmark.pedantic(run_long_prompt, args=(chunk,), rounds=1, iterations=1))
