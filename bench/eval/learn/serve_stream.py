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
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
SYSTEM = ("You are a careful problem solver with a Python tool. Keep answers short. When asked for code, reply "
          "with one ```python code block that prints the answer.")


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


def extract_code(text: str) -> str | None:
    import re

    m = re.search(r"```(?:python|py)?\s*\n(.*?)```", text, re.S)
    return m.group(1) if m else None


def agent(client, task: dict, trace: bool) -> dict:
    """One task as a plain openai-SDK agent would run it: program, tool output, answer."""
    from hera_core.checks.sandbox import run_python

    headers = {"X-Hera-Session": task["id"], **({} if trace else {"X-Hera-Trace": "off"})}
    messages = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": f"Solve the following problem.\n\n{task['question']}\n\n"
                                            "Write a short Python program that computes and prints the answer."}]
    steps = []
    for k in range(3):
        t0 = time.perf_counter()
        r = client.chat.completions.with_raw_response.create(model="hera", messages=messages, max_tokens=384,
                                                              temperature=0, extra_headers=headers)
        body = r.parse()
        text = body.choices[0].message.content or ""
        steps.append({"step": k, "route": r.headers.get("x-hera-route"), "reason": r.headers.get("x-hera-reason"),
                      "latency_s": round(time.perf_counter() - t0, 3),
                      "predictor_version": (body.model_extra or {}).get("hera", {}).get("predictor_version")})
        messages.append({"role": "assistant", "content": text})
        code = extract_code(text)
        if code is None or k == 2:
            break
        ok, out = run_python(code, timeout_s=5.0)
        if ok:
            reply = f"The program printed:\n{out}\nReply with only the final answer, as: ANSWER: <answer>"
        elif k == 0:
            reply = f"The program failed:\n{out}\nFix the program. Reply with one ```python code block."
        else:
            reply = f"The program failed again:\n{out}\nReason it out briefly and reply with: ANSWER: <answer>"
        messages.append({"role": "user", "content": reply})
    final = messages[-1]["content"]
    answer = final.split("ANSWER:")[-1].strip() if "ANSWER:" in final else final.strip()
    return {"task_id": task["id"], "family": task["family"], "answer": answer, "steps": steps}


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

    tasks = [json.loads(line) for line in (HERE / "stream.jsonl").read_text().splitlines()][:args.tasks]
    scorers = {t.task_id: t for t in load_jsonl_tasks(str(HERE / "stream.jsonl"))}
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
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{args.port}/v1", api_key="none", timeout=600)
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeRemainingColumn()) as bar:
            job = bar.add_task("stream through hera serve", total=len(tasks), completed=len(done))
            for task in tasks:
                if task["id"] in done:
                    continue
                result = agent(client, task, trace=True)
                result["correct"] = scorers[task["id"]].score(result["answer"])
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
