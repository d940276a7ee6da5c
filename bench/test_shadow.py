"""What shadow drafting costs a client: the latency of cloud-routed steps at 8 concurrent sessions
with the learning loop on (every cloud step drafted by the SLM while it is idle, the pair traced and
labelled) against off, on the same engines, prompts and machine, in one run (docs/learning.md).

The SLM (Qwen2.5-Coder-0.5B, in this process) and the cloud stand-in (`hera cloud-sim` serving
Qwen2.5-Coder-1.5B over HTTP, a peer) run on separate cores (CPU affinity), as the device and the
cloud are separate machines in production: a shadow draft competes with the client's own work on
the device (its scoring prefill), never with the cloud's decoding. Each round runs the 8 sessions'
steps once with learning off and once on, alternating which goes first; every step is routed to
the cloud (kappa 1.01: the shipped path up to the decision, scoring prefill included).

extra_info: median_off_s, median_on_s, ratio_on_vs_off (the figure the issue's target reads: at
most 1.05), steps, failures (must be 0), and the learning loop's counters (shadows started,
skipped because the SLM was busy, cancelled by a client step, done).
Smoke mode (HERA_BENCH_SMOKE=1): SmolLM2-135M on both sides, one round, 16 tokens.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pytest

from bench.support import Peer, sized
from hera_core.install.models import model_path

SLM = sized("qwen2.5-coder-0.5b", "smollm2-135m")
LLM = sized("qwen2.5-coder-1.5b", "smollm2-135m")
SESSIONS = 8
ROUNDS = sized(3, 1)
MAX_TOKENS = sized(64, 16)
HERE = Path(__file__).resolve().parent


def prompts() -> list[list[dict]]:
    from hera_core.offline.harness import first_messages
    from hera_core.offline.workloads import load_jsonl_tasks

    tasks = load_jsonl_tasks(str(HERE / "eval" / "learn" / "stream.jsonl"))
    seen: dict[str, object] = {}
    for t in tasks:  # one task of each family, then the next ones: 8 different agents' first steps
        seen.setdefault(t.family, t)
    return [first_messages(t) for t in list(seen.values())[:SESSIONS]]


def measure(cloud_url: str) -> dict:
    from hera_core.backends.cloud import CloudEngine
    from hera_core.backends.llamacpp import LlamaCppEngine
    from hera_core.config import LearningSettings, load_settings
    from hera_core.routing.learning import LiveLearner
    from hera_core.routing.ledger import Ledger
    from hera_core.routing.predictor import Kappa, Predictor
    from hera_core.routing.runtime import Runtime
    from hera_core.serving.assembly import attach_learning

    msgs = prompts()

    async def go():
        folder = Path(tempfile.mkdtemp())
        engine = LlamaCppEngine(model_path(SLM), name=SLM, n_ctx=4096, n_threads=1, n_slots=SESSIONS + 1)
        cloud = CloudEngine(cloud_url + "/v1", LLM, timeout_s=600)
        predictor = Predictor.load()
        # every step to the cloud: no workload's own point, no draft stage, kappa above any P
        predictor.kappa, predictor.workloads, predictor.draft = Kappa(base=1.01), (), None
        learner = LiveLearner(LearningSettings(shadow=True), folder / "learning", predictor)
        prices = load_settings(env={}).prices
        rts = {}
        for arm in ("off", "on"):
            rts[arm] = Runtime(engine, cloud, predictor, Ledger(folder / f"{arm}.sqlite"), prices, run=arm,
                               max_tokens=MAX_TOKENS, unfamiliar="trust")
        attach_learning(rts["on"], learner)
        lat = {"off": [], "on": []}
        failures = 0

        async def step(rt, i, rnd, arm):
            t0 = time.perf_counter()
            r = await rt.complete(msgs[i % len(msgs)], session=f"{arm}-{rnd}-{i}", step=0)
            assert r.route.value == "cloud"
            lat[arm].append(time.perf_counter() - t0)

        for rnd in range(ROUNDS):
            for arm in (("off", "on") if rnd % 2 == 0 else ("on", "off")):
                out = await asyncio.gather(*(step(rts[arm], i, rnd, arm) for i in range(SESSIONS)),
                                           return_exceptions=True)
                failures += sum(isinstance(x, BaseException) for x in out)
                if arm == "on":
                    await rts["on"].learning.drain()  # the labels, off the clock of the next round
        stats = dict(rts["on"].learning.status()["stats"])
        await rts["on"].learning.close()
        for rt in rts.values():
            rt.ledger.close()
        await cloud.close()
        await engine.close()
        return {"median_off_s": statistics.median(lat["off"]), "median_on_s": statistics.median(lat["on"]),
                "steps": len(lat["off"]) + len(lat["on"]), "failures": failures, **stats}

    return asyncio.run(go())


@pytest.fixture(scope="module")
def cloud_peer(tmp_path_factory):
    log = tmp_path_factory.mktemp("shadow") / "cloud-sim.log"
    cores = sorted(os.sched_getaffinity(0))
    pin = ["taskset", "-c", str(cores[-1])] if len(cores) > 1 else []
    peer = Peer("cloud-sim", lambda port: [*pin, sys.executable, "-m", "hera_core.cli", "cloud-sim", "--model", LLM,
                                           "--port", str(port), "--threads", "1"], "/healthz", log, timeout_s=300)
    yield peer.start(), cores
    peer.stop()


def test_shadow_drafts_latency_at_8_sessions(benchmark, cloud_peer):
    """Cloud-routed steps at 8 concurrent sessions, learning off vs on (shadow drafts)."""
    peer, cores = cloud_peer
    before = os.sched_getaffinity(0)
    if len(cores) > 1:
        os.sched_setaffinity(0, set(cores[:-1]))  # the device's cores; the cloud has the last one
    try:
        result = benchmark.pedantic(lambda: peer.run(measure), rounds=1, iterations=1)
    finally:
        os.sched_setaffinity(0, before)
    assert result["failures"] == 0  # shadow drafting never fails a client's request
    assert result.get("shadow_started", 0) + result.get("shadow_skipped_busy", 0) == result["steps"] // 2
    benchmark.extra_info.update(result)
    benchmark.extra_info["ratio_on_vs_off"] = result["median_on_s"] / result["median_off_s"]
