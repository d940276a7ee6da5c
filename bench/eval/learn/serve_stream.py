"""The learning stream served live: an agent of its own (the openai SDK, a Python tool run in the
sandbox) drives bench/eval/learn/stream.jsonl through `hera serve` over HTTP, learning on, no label
given to HERA. Each task: the agent asks for a program, runs it, sends its output back and asks for
the answer; every call goes to model "hera". Tasks are scored afterwards against their answers.

Resumable: one JSON line per finished task in --out (a rerun skips those; the server keeps its
trace store and predictor versions in <cache_dir>/learning, so learning resumes too).

The cloud stand-in runs on its own core and `hera serve` (with the SLM) on the other (taskset), so
a shadow draft competes with the cloud for CPU no more than on separate machines.

    .venv/bin/python bench/eval/learn/serve_stream.py --tasks 40 --cache-dir /tmp/hera-learn
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
MAX_TOKENS = 384  # the profile's completion limit (offline/profiling.py)


def wait_for(url: str, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout_s:
        if proc.poll() is not None:
            raise SystemExit(f"{url}: the process exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(1)
    raise SystemExit(f"{url} not ready after {timeout_s} s")


async def agent(client, task, trace: bool) -> dict:
    """One task run by the harness's own agent (`harness.run_task`: the prompts, the sandboxed
    program run, the retry and the answer extraction the profiled traces were made with), every
    step sent over HTTP to model "hera" as an openai-SDK agent would send it. The first run of
    this script had an agent of its own that differed from the harness's (it stopped at a reply
    without code, and took a sentence as the answer), so its tasks were not comparable with the
    profiled LLM's: docs/learning.md."""
    from hera_core.offline.harness import run_task

    headers = {"X-Hera-Session": task.task_id, **({} if trace else {"X-Hera-Trace": "off"})}
    steps = []

    async def step_fn(messages, index):
        t0 = time.perf_counter()
        r = await client.chat.completions.with_raw_response.create(
            model="hera", messages=messages, max_tokens=MAX_TOKENS, temperature=0, extra_headers=headers)
        body = r.parse()
        text = body.choices[0].message.content or ""
        route = r.headers.get("x-hera-route")
        steps.append({"step": index, "route": route, "reason": r.headers.get("x-hera-reason"),
                      "latency_s": round(time.perf_counter() - t0, 3),
                      "predictor_version": (body.model_extra or {}).get("hera", {}).get("predictor_version")})
        return text, route

    traj = await run_task(task, step_fn)
    return {"task_id": task.task_id, "family": task.family, "answer": traj.answer, "steps": steps,
            "correct": traj.correct}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=200, help="first N tasks of the stream")
    ap.add_argument("--cache-dir", required=True, help="where the server keeps its ledger and learning folder")
    ap.add_argument("--out", default=str(HERE / "serve-stream.jsonl"))
    ap.add_argument("--retrain-every", type=int, default=40)
    ap.add_argument("--min-labels", type=int, default=60)
    ap.add_argument("--port", type=int, default=8099)
    args = ap.parse_args()
    import openai

    from hera_core.offline.workloads import load_jsonl_tasks

    tasks = load_jsonl_tasks(str(HERE / "stream.jsonl"))[:args.tasks]  # in the stream's order
    out = Path(args.out)
    done = {json.loads(line)["task_id"] for line in out.read_text().splitlines()} if out.exists() else set()
    cache = Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    config = cache / "hera.toml"
    cloud_port = args.port + 1
    config.write_text(f'ledger_path = "{cache / "ledger.sqlite"}"\n[cloud]\nbase_url = "http://127.0.0.1:{cloud_port}/v1"\n'
                      f'model = "qwen2.5-coder-1.5b"\n[local]\nmodel = "qwen2.5-coder-0.5b"\nn_threads = 1\n'
                      f'[learning]\nshadow = true\nfolder = "{cache / "learning"}"\nretrain_every = {args.retrain_every}\n'
                      f'min_labels = {args.min_labels}\n')
    env = dict(os.environ)
    cloud = subprocess.Popen(["taskset", "-c", "1", sys.executable, "-m", "hera_core.cli", "cloud-sim",
                              "--model", "qwen2.5-coder-1.5b", "--port", str(cloud_port), "--threads", "1"],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = subprocess.Popen(["taskset", "-c", "0", sys.executable, "-m", "hera_core.cli", "--config", str(config),
                               "serve", "--port", str(args.port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=open(cache / "serve.log", "a"))
    try:
        wait_for(f"http://127.0.0.1:{cloud_port}/healthz", cloud)
        wait_for(f"http://127.0.0.1:{args.port}/healthz", server)
        async def one_task(task):  # a client per event loop: asyncio.run makes a new loop per task
            async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{args.port}/v1", api_key="none",
                                          timeout=600) as client:
                return await agent(client, task, trace=True)

        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeRemainingColumn()) as bar:
            job = bar.add_task("stream through hera serve", total=len(tasks), completed=len(done))
            for task in tasks:
                if task.task_id in done:
                    continue
                result = asyncio.run(one_task(task))
                with out.open("a") as f:
                    f.write(json.dumps(result) + "\n")
                bar.advance(job)
        status = json.load(urllib.request.urlopen(f"http://127.0.0.1:{args.port}/v1/hera/learning"))
        ledger = json.load(urllib.request.urlopen(f"http://127.0.0.1:{args.port}/v1/hera/ledger?run=serve"))
        (out.with_suffix(".status.json")).write_text(json.dumps({"learning": status, "ledger": ledger["totals"]},
                                                                indent=1) + "\n")
        print(json.dumps({"learning": {k: status[k] for k in ("current", "traced_steps", "labelled_steps")},
                          "ledger": ledger["totals"]}, indent=1))
    finally:
        for p in (server, cloud):
            p.terminate()
            p.wait(timeout=30)


if __name__ == "__main__":
    main()
