"""The learning loop replayed over the committed stream (#30 item 5): what `hera serve` with
learning on does with 200 tasks of eight families no shipped predictor was trained on, step by step
in stream order, with no ground-truth label given to it.

Per step, the predictor in use plans the step (`hera_core.routing.plan.plan_step`, the runtime's
own plan; the shipped predictor finds every stream step unfamiliar and sends it to the cloud). A
cloud step's shadow draft is the SLM's traced answer to the same messages; the pair goes to the
same `LiveLearner` the server runs (trace store, agreement label with programs run in the sandbox,
retrain every `--retrain-every` labels with the confidence-bound calibration, audits of local steps
at the audit share with automatic rollback). What replay assumes of the live loop: every cloud step
gets its shadow draft (a sequential agent leaves the SLM idle while the cloud answers), and the
traced outputs are what the models answer live (greedy decoding, the same prompts).

A task's accuracy is the profile's estimate used by `hera train` (`estimate_routes`: one step
local -> the task's profiled outcome with exactly that step on the SLM; several -> the LLM's outcome
if every one of them is substitutable by the profile's label, else wrong). Its cloud cost counts
the cloud steps and the audits' cloud calls at the default prices; the shadows' device energy is
reported apart.

Arms on the tasks after the warm-up: HERA (learning, no labels), All-LLM, and `offline_profiled`:
a predictor trained by `hera train` with the ground-truth substitution labels of the warm-up tasks
(the same tasks HERA learned from, profiled offline; its val split calibrates kappa for at most 3
points below the LLM), frozen. Also: small-data safety (learned from the labels of a few dozen
tasks only, then frozen, on the held-out rest), for two disjoint small sets.

Writes bench/eval/learn/report.json and learning-curve.png.

    .venv/bin/python bench/eval/learn/replay.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
from pathlib import Path

import numpy as np

from hera_core.config import LearningSettings, PriceSettings
from hera_core.offline.drafts import step_prompts
from hera_core.offline.stats import paired_bootstrap
from hera_core.offline.profiling import load_traces
from hera_core.offline.training import chars_per_token, estimate_routes, step_cloud_tokens, train
from hera_core.offline.workloads import load_jsonl_tasks
from hera_core.routing.learning import LiveLearner, NotEnoughLabels, trace_row
from hera_core.routing.plan import Action, StepFacts, plan_step
from hera_core.routing.predictor import Predictor
from hera_core.routing.runtime import predictor_version

HERE = Path(__file__).resolve().parent
PRICES = PriceSettings()


def load_stream() -> list[dict]:
    """The stream's traces in stream order, each with the messages of its steps."""
    tasks = load_jsonl_tasks(str(HERE / "stream.jsonl"))
    traces = {t["task_id"]: t for s in ("train", "val", "test") for t in load_traces(HERE / f"traces-stream-{s}.jsonl")}

    async def prompts():
        for task in tasks:
            t = traces[task.task_id]
            t["messages"] = await step_prompts(task, [s["llm_text"] for s in t["steps"]])

    asyncio.run(prompts())
    return [traces[task.task_id] for task in tasks]


def plan(predictor: Predictor, step: dict, messages: list[dict]) -> bool:
    """True when the runtime's plan keeps this step local (no draft stage in play here)."""
    X = np.asarray([step["features"]], dtype=np.float32)
    fam = predictor.familiarity
    facts = StepFacts(step=step["step"], p_local=float(predictor.predict(X)[0]),
                      threshold=predictor.kappa.at(step["step"], float(step["prompt_tokens"])),
                      unfamiliar=fam is not None and not fam.familiar(messages), on_unfamiliar="cloud")
    p = plan_step(facts)
    if p.action not in (Action.LOCAL, Action.CLOUD):
        raise RuntimeError(f"the replay has no drafts; got a {p.action.value} plan")
    return p.action is Action.LOCAL


def step_cost(step: dict, cpt: float) -> float:
    return PRICES.cloud_cost(*step_cloud_tokens(step, cpt))


def task_outcome(trace: dict, local: list[bool], cpt: float, audit_cost: float = 0.0) -> dict:
    est = estimate_routes([trace], [local], 0.0)
    return {"task_id": trace["task_id"], "family": trace["family"], "correct": est.accuracy,
            "llm_correct": trace["llm_correct"], "steps": len(local), "local_steps": sum(local),
            "cloud_cost": sum(step_cost(s, cpt) for s, f in zip(trace["steps"], local) if not f) + audit_cost,
            "all_cloud_cost": sum(step_cost(s, cpt) for s in trace["steps"])}


def run_learning(stream: list[dict], settings: LearningSettings, cpt: float, seed: int, *,
                 freeze_after: int | None = None, progress=None) -> tuple[list[dict], dict]:
    """The live loop over the stream; `freeze_after`: after that many tasks, learn once (`hera
    learn`) and stop learning (no traces, no audits): a predictor learned from few tasks, tested."""
    with tempfile.TemporaryDirectory() as folder:
        learner = LiveLearner(settings, folder, Predictor.load(), rng=random.Random(seed))
        predictor = learner.predictor()
        out = []
        for i, trace in enumerate(stream):
            if i == freeze_after:
                try:
                    predictor = learner.learn_now().predictor
                except NotEnoughLabels:
                    pass
            learning = freeze_after is None or i < freeze_after
            local_flags, audit_cost = [], 0.0
            version = predictor_version(predictor)
            for step, messages in zip(trace["steps"], trace["messages"]):
                local = plan(predictor, step, messages)
                local_flags.append(local)
                if not learning:
                    continue
                kind = None
                if not local:
                    kind = "shadow"
                elif learner.should_audit():
                    kind = "audit"
                    audit_cost += step_cost(step, cpt)
                if kind is None:
                    continue
                row = trace_row(kind, session=trace["task_id"], step=step["step"], messages=messages,
                                features=np.asarray(step["features"]), version=version,
                                cloud=(step["llm_text"], None), draft=(step["slm_text"], None))
                event = learner.add(row)
                if event is not None:  # swapped between requests, as the server does
                    predictor = event.predictor
                    version = event.version
            outcome = task_outcome(trace, local_flags, cpt, audit_cost)
            outcome["predictor_version"] = version
            out.append(outcome)
            if progress is not None:
                progress()
        status = learner.status()
        learner.close()
    return out, status


def offline_profiled(stream: list[dict], warmup: int, cpt: float) -> tuple[list[dict], dict]:
    """`hera train` on the warm-up tasks' ground-truth labels (their own val split calibrates),
    frozen, on the rest. Single-stage (draft features left out), as HERA's learned predictor."""
    warm = []
    for t in stream[:warmup]:
        t2 = {k: v for k, v in t.items() if k != "messages"}
        t2["split"] = "val" if t["split"] == "val" else "train"
        t2["steps"] = [{k: v for k, v in s.items() if k not in ("draft_features", "draft_feature_names")}
                       for s in t["steps"]]
        warm.append(t2)
    openings = {t["task_id"]: t["messages"][0][-1]["content"] for t in stream[:warmup]}
    predictor, report = train(warm, openings=openings)
    out = []
    for trace in stream[warmup:]:
        local = [plan(predictor, s, m) for s, m in zip(trace["steps"], trace["messages"])]
        out.append(task_outcome(trace, local, cpt))
    return out, {k: report[k] for k in ("train_rows", "val_rows", "auc_train", "auc_val", "kappa", "calibration")}


def summary(rows: list[dict], key: str = "correct", cost: str = "cloud_cost") -> dict:
    n = len(rows)
    all_cloud = sum(r["all_cloud_cost"] for r in rows)
    return {"tasks": n, "accuracy": round(sum(r[key] for r in rows) / n, 4),
            "cost_ratio": round(sum(r[cost] for r in rows) / all_cloud, 4),
            "local_share": round(sum(r["local_steps"] for r in rows) / sum(r["steps"] for r in rows), 4)}


def all_llm(rows: list[dict]) -> list[dict]:
    return [{**r, "correct": r["llm_correct"], "cloud_cost": r["all_cloud_cost"], "local_steps": 0} for r in rows]


def windows(rows: list[dict], size: int) -> list[dict]:
    out = []
    for start in range(0, len(rows), size):
        w = rows[start:start + size]
        out.append({"tasks": [start, start + len(w)], "hera": summary(w), "all_llm": summary(all_llm(w)),
                    "versions": sorted({r["predictor_version"] for r in w})})
    return out


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ws = report["windows"]
    x = [w["tasks"][1] for w in ws]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].plot(x, [w["hera"]["accuracy"] for w in ws], "o-", label="HERA (learning, no labels)")
    ax[0].plot(x, [w["all_llm"]["accuracy"] for w in ws], "s--", label="All-LLM")
    ax[0].axvline(report["warmup_tasks"], color="grey", lw=0.8)
    ax[0].set(xlabel="tasks served", ylabel=f"accuracy per window of {report['window']}", ylim=(0, 1))
    ax[0].legend()
    ax[1].plot(x, [w["hera"]["cost_ratio"] for w in ws], "o-", label="HERA cloud cost / All-LLM's")
    ax[1].plot(x, [w["hera"]["local_share"] for w in ws], "^-", label="HERA local share of steps")
    ax[1].axvline(report["warmup_tasks"], color="grey", lw=0.8)
    ax[1].set(xlabel="tasks served", ylim=(0, 1.05))
    ax[1].legend()
    fig.suptitle("Learning the served agent from its own traffic (replay of the stream)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--warmup", type=int, default=100, help="tasks before the reported window")
    ap.add_argument("--retrain-every", type=int, default=40, help="new labels between retrains")
    ap.add_argument("--min-labels", type=int, default=60)
    ap.add_argument("--audit-share", type=float, default=0.05)
    ap.add_argument("--target", type=float, default=0.9, help="target agreement of local steps (lower bound)")
    ap.add_argument("--window", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(HERE / "report.json"))
    args = ap.parse_args()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    stream = load_stream()
    cpt = chars_per_token(stream)
    settings = LearningSettings(shadow=True, retrain_every=args.retrain_every, min_labels=args.min_labels,
                                audit_share=args.audit_share, target_agreement=args.target)
    small = LearningSettings(shadow=True, retrain_every=0, min_labels=30, audit_share=0.0,
                             target_agreement=args.target)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()) as bar:
        job = bar.add_task("learning loop over the stream", total=len(stream))
        rows, status = run_learning(stream, settings, cpt, args.seed, progress=lambda: bar.advance(job))
        small_sets = []
        held_out = stream[80:]  # disjoint from both small sets
        for start, n in ((0, 40), (40, 40)):  # two disjoint small sets of tasks to learn from
            job = bar.add_task(f"learned from tasks {start}-{start + n} only", total=n + len(held_out))
            srows, sstatus = run_learning(stream[start:start + n] + held_out, small, cpt, args.seed,
                                          freeze_after=n, progress=lambda job=job: bar.advance(job))
            held = srows[n:]
            small_sets.append({"learned_from_tasks": [start, start + n], "held_out_tasks": [80, len(stream)],
                               "labelled_steps": sstatus["labelled_steps"], "version": sstatus["current"],
                               "learned": sstatus["events"][-1] if sstatus["events"] else None,
                               "hera": summary(held), "all_llm": summary(all_llm(held)),
                               "hera_vs_all_llm": paired_bootstrap([r["correct"] for r in held],
                                                                   [r["llm_correct"] for r in held])})
        off_rows, off_report = offline_profiled(stream, args.warmup, cpt)
        sweep = {}
        for target in (0.8, 0.85, 0.95):  # how the target trades cost for accuracy (not chosen on it)
            job = bar.add_task(f"target agreement {target}", total=len(stream))
            srows, _ = run_learning(stream, settings.model_copy(update={"target_agreement": target}), cpt, args.seed,
                                    progress=lambda job=job: bar.advance(job))
            sweep[str(target)] = {**summary(srows[args.warmup:]), "vs_all_llm": paired_bootstrap(
                [r["correct"] for r in srows[args.warmup:]], [r["llm_correct"] for r in srows[args.warmup:]])}
    after = rows[args.warmup:]
    hera_s, llm_s, off_s = summary(after), summary(all_llm(after)), summary(off_rows)
    report = {
        "what": "the learning loop replayed over bench/eval/learn/stream.jsonl's committed traces "
                "(bench/eval/learn/replay.py; docs/learning.md)",
        "warmup_tasks": args.warmup, "ground_truth_labels_used": 0, "window": args.window,
        "settings": settings.model_dump(),
        "after_warmup": {"hera": hera_s, "all_llm": llm_s, "offline_profiled": off_s},
        "hera_vs_all_llm": paired_bootstrap([r["correct"] for r in after], [r["llm_correct"] for r in after]),
        "hera_vs_offline_profiled": paired_bootstrap([r["correct"] for r in after], [r["correct"] for r in off_rows]),
        "offline_profiled_training": off_report,
        "windows": windows(rows, args.window),
        "learning": {k: status[k] for k in ("current", "versions", "traced_steps", "labelled_steps", "audit",
                                            "events")},
        "small_data": small_sets,
        "target_sweep_after_warmup": sweep,
    }
    Path(args.out).write_text(json.dumps(report, indent=1, default=str) + "\n")
    plot(report, Path(args.out).with_name("learning-curve.png"))
    print(json.dumps(report["after_warmup"], indent=1))
    print(json.dumps(report["hera_vs_all_llm"]), json.dumps(report["hera_vs_offline_profiled"]))


if __name__ == "__main__":
    main()
