"""The learning stream served live: an agent of its own (the openai SDK, a Python tool run in the
sandbox) drives bench/eval/learn/stream.jsonl through `hera serve` over HTTP, learning on, no label
given to HERA. Each task: the agent asks for a program, runs it, sends its output back and asks for
the answer; every call goes to model "hera". Tasks are scored afterwards against their answers.

Resumable: one JSON line per finished task in --out (a rerun skips those; the server keeps its
trace store and predictor versions in <cache_dir>/learning, so learning resumes too).

The cloud stand-in runs on its own core and `hera serve` (with the SLM) on the other (taskset), so
a shadow draft competes with the cloud for CPU no more than on separate machines.

    .venv/bin/python bench/eval/learn/serve_stream.py --tasks 40 --cache-dir /tmp/hera-learn
    .venv/bin/python bench/eval/learn/serve_stream.py --summary --cache-dir /tmp/hera-learn   # again

The summary (`<out>.summary.json`, also written at the end of a run): per window of 50 tasks and
after a warm-up of 50 and of 100 tasks, live HERA's accuracy against the profiled LLM's on the same
tasks (paired 95% interval), its local share, and its cloud spend against All-LLM's on the same
steps (from the server's ledger: answers alone, with the audits' cloud calls, and with the
device's energy too).
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


def summarize(out: Path, ledger_path: Path) -> dict:
    """The run's summary (see the module doc), from its task lines, the profiled traces of the same
    tasks and the server's ledger."""
    import sqlite3

    from hera_core.offline.stats import paired_bootstrap

    profiled = {}
    for split in ("train", "val", "test"):
        for line in (HERE / f"traces-stream-{split}.jsonl").read_text().splitlines():
            trace = json.loads(line)
            profiled[trace["task_id"]] = trace["llm_correct"]
    order = [json.loads(line)["id"] for line in (HERE / "stream.jsonl").read_text().splitlines()]
    live = {r["task_id"]: r for r in map(json.loads, out.read_text().splitlines())}
    tasks = [t for t in order if t in live]
    db = sqlite3.connect(f"file:{ledger_path}?mode=ro", uri=True)
    rows = db.execute("SELECT session, route, status, cost_usd, cloud_cost_usd FROM subtasks WHERE run='serve'").fetchall()
    db.close()

    def window(ids: list[str]) -> dict:
        chosen = set(ids)
        served = [r for r in rows if r[0] in chosen and r[2] == "ok"]
        all_llm = sum(r[4] for r in served)
        cloud = sum(r[3] for r in served if r[1] == "cloud")
        audits = sum(r[3] for r in rows if r[0] in chosen and r[2] == "audit")
        device = sum(r[3] for r in served if r[1] == "local") + \
            sum(r[3] for r in rows if r[0] in chosen and r[2] == "shadow")
        hera = [float(live[t]["correct"]) for t in ids]
        llm = [float(profiled[t]) for t in ids]
        paired = paired_bootstrap(hera, llm)
        return {"tasks": len(ids), "accuracy": round(sum(hera) / len(ids), 4),
                "profiled_llm_accuracy": round(sum(llm) / len(ids), 4),
                "diff": round(paired["diff"], 4), "diff_ci95": [round(x, 4) for x in paired["ci95"]],
                "local_share": round(sum(r[1] == "local" for r in served) / len(served), 4) if served else 0.0,
                "cloud_ratio": round(cloud / all_llm, 4) if all_llm else None,
                "cloud_ratio_with_audits": round((cloud + audits) / all_llm, 4) if all_llm else None,
                "cost_ratio_with_device": round((cloud + audits + device) / all_llm, 4) if all_llm else None,
                "predictor_versions": sorted({s["predictor_version"] for t in ids for s in live[t]["steps"]})}

    return {"what": "the learning stream served live through hera serve by the harness's own agent "
                    "(bench/eval/learn/serve_stream.py); no ground-truth label given to HERA",
            "ground_truth_labels_used": 0, "tasks": len(tasks),
            "windows": {f"{a}-{a + 49}": window(tasks[a:a + 50]) for a in range(0, len(tasks), 50)},
            "after_warmup": {str(w): window(tasks[w:]) for w in (50, 100) if len(tasks) > w}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=200, help="first N tasks of the stream")
    ap.add_argument("--cache-dir", required=True, help="where the server keeps its ledger and learning folder")
    ap.add_argument("--out", default=str(HERE / "serve-stream.jsonl"))
    ap.add_argument("--retrain-every", type=int, default=40)
    ap.add_argument("--min-labels", type=int, default=60)
    ap.add_argument("--port", type=int, default=8099)
    ap.add_argument("--summary", action="store_true", help="only (re)write the summary of a finished run")
    args = ap.parse_args()
    out = Path(args.out)
    summary_path = out.with_suffix(".summary.json")
    if args.summary:
        summary_path.write_text(json.dumps(summarize(out, Path(args.cache_dir) / "ledger.sqlite"), indent=1) + "\n")
        print(summary_path.read_text())
        return
    import openai

    from hera_core.offline.workloads import load_jsonl_tasks

    tasks = load_jsonl_tasks(str(HERE / "stream.jsonl"))[:args.tasks]  # in the stream's order
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
        summary_path.write_text(json.dumps(summarize(out, cache / "ledger.sqlite"), indent=1) + "\n")
    finally:
        for p in (server, cloud):
            p.terminate()
            p.wait(timeout=30)


if __name__ == "__main__":
    main()
